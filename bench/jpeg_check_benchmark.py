"""How much image validation the conversion can afford: header check against full decodes.

    python -m bench.jpeg_check_benchmark [--repeat=20]

On the 110 real pictures of data/train_example.bson, one thread each, microseconds a picture.
"""

import argparse
import io
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bson
from PIL import Image

from beam_convert.jpeg_check import check_jpeg

SAMPLE = pathlib.Path(__file__).resolve().parent.parent / "data" / "train_example.bson"


def per_picture_us(fn, pictures, repeat):
    fn(pictures[0])
    started = time.perf_counter()
    for _ in range(repeat):
        for picture in pictures:
            fn(picture)
    return (time.perf_counter() - started) / (repeat * len(pictures)) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with open(SAMPLE, "rb") as f:
        pictures = [img["picture"] for doc in bson.decode_file_iter(f) for img in doc["imgs"]]

    import tensorflow as tf

    def pil_decode(data):
        with Image.open(io.BytesIO(data)) as image:
            image.load()

    candidates = {
        "header check (beam_convert.jpeg_check)": check_jpeg,
        "PIL full decode": pil_decode,
        "tf.io.decode_jpeg, eager": lambda data: tf.io.decode_jpeg(data, channels=3),
    }
    check = per_picture_us(check_jpeg, pictures, args.repeat)
    print(f"{'validation':42s} {'us/picture':>11s} {'vs header':>10s}")
    for name, fn in candidates.items():
        us = per_picture_us(fn, pictures, args.repeat)
        print(f"{name:42s} {us:11.1f} {us / check:9.1f}x")


if __name__ == "__main__":
    main()
