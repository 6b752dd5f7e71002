"""Train on your own labelled images: class folders, or a TensorFlow Datasets catalog dataset prepared locally.

python -m train.images --data-dir /data/pets --arch resnet50 --weights resnet50.safetensors --out runs/pets
python -m train.images --tfds beans --tfds-data-dir ~/tensorflow_datasets --out runs/beans   # --help: every flag
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.train.cli:main", "images", name="python -m train.images")
