"""The explanation job's stages (`delib_jax.stream.explain_files` wires them; each is a small unit of its own):

folder.py   the output folder: lock, manifest, fingerprints, and the resume plan (what is done, what is left)
reading.py  the reader stage: batches of files submitted to `delib_jax._reader.Reader` several ahead, and the
            hand-over between the device stage and the writer (`Channel`)
device.py   the compiled device step: explanation plus compact outputs, dispatched without waiting
writing.py  the writer stage: fetch, checks, index records, `store.ShardWriter`, and its consumer the figures
"""
