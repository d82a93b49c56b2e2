"""A pose estimator outside cryopose, run as a `command` method: nearest neighbour in image space.

train:   nearest_view.py train   PARTICLES_STAR MODEL_DIR
predict: nearest_view.py predict PARTICLES_STAR MODEL_DIR OUTPUT_STAR

Training keeps the half's images, low-passed and shrunk to 24 pixels, each turned in plane by 36
angles (scipy's turn of the image by a is a change of psi by +a: on a simulated C1 half of 1,500
particles, MAnE 99°; with 12 turns 107°, and 122° with -a; random poses 126°);
prediction gives each blind image the angles of the most correlated training view, and the
correlation's margin over the median as its confidence. It reads and writes RELION STAR files
with `starfile` and images with `mrcfile`; nothing of cryopose is imported.
"""

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy import ndimage

SIDE = 24
TURNS = 36


def read_images(star_path):
    """The STAR file's tables, its particles and their images, shrunk to SIDE × SIDE by Fourier cropping."""
    tables = starfile.read(star_path, always_dict=True)
    table = tables["particles"]
    stacks, images = {}, []
    for name in table["rlnImageName"]:
        index, path = name.split("@", 1)
        if path not in stacks:
            stacks[path] = mrcfile.mmap(path, permissive=True).data
        image = np.asarray(stacks[path][int(index) - 1], dtype=np.float64)
        f = np.fft.fftshift(np.fft.fft2(image))
        c, h = image.shape[0] // 2, SIDE // 2
        small = np.fft.ifft2(np.fft.ifftshift(f[c - h : c + h, c - h : c + h])).real
        images.append(small)
    return tables, table, np.stack(images)


def normalised(images):
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE / 2
    disc = (yy**2 + xx**2) < (SIDE / 2) ** 2
    flat = images[:, disc]
    flat = flat - flat.mean(1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def train(star_path, model_dir):
    _, table, images = read_images(star_path)
    views, angles = [], []
    for k in range(TURNS):
        a = 360.0 * k / TURNS
        views.append(ndimage.rotate(images, a, axes=(2, 1), reshape=False, order=1))
        turned = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64).copy()
        turned[:, 2] = (turned[:, 2] + a + 180.0) % 360.0 - 180.0
        angles.append(turned)
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    np.savez(Path(model_dir) / "views.npz", views=normalised(np.concatenate(views)), angles=np.concatenate(angles))
    print(f"kept {len(table)} images x {TURNS} turns at {SIDE} px")


def predict(star_path, model_dir, out_path):
    model = np.load(Path(model_dir) / "views.npz")
    tables, table, images = read_images(star_path)
    scores = normalised(images) @ model["views"].T
    best = scores.argmax(1)
    top = scores[np.arange(len(best)), best]
    angles = model["angles"][best]
    out = pd.DataFrame(
        {
            "rlnImageName": table["rlnImageName"],
            "rlnOpticsGroup": table["rlnOpticsGroup"],
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnMaxValueProbDistribution": top - np.median(scores, axis=1),
        }
    )
    starfile.write({"optics": tables["optics"], "particles": out}, out_path, overwrite=True)
    print(f"predicted {len(out)} particles")


if __name__ == "__main__":
    stage, *args = sys.argv[1:]
    {"train": train, "predict": predict}[stage](*args)
