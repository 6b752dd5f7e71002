"""The explanation job's stages (`delib_jax.stream.explain_files` wires them; each is a small unit of its own):

inputs.py   what is explained: files (`folder.PathList`) or a dataset's split (`DatasetInputs`, a release folder
            or a TFDS build), each item's source name, fingerprint, what the reader decodes, and its record fields
folder.py   the output folder: lock, manifest, fingerprints, and the resume plan (what is done, what is left)
reading.py  the reader stage: batches of files submitted to `delib_jax._reader.Reader` several ahead, and the
            hand-over between the device stage and the writer (`Channel`)
device.py   the compiled device step: explanation plus compact outputs, dispatched without waiting
writing.py  the writer stage: fetch, checks, index records, `store.ShardWriter`, and its consumer the figures
"""
