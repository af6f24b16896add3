"""
A pipeline from image files
===========================

Images usually live on disk. :class:`~skpatchcore.ImageReader` is a stateless
transformer that reads paths (PNG, JPEG, BMP, TIFF, 8 or 16 bits, grayscale or
colour) into the array the detector takes, so a pipeline fits, predicts and
cross-validates on lists of file names, and only the images of one call are
ever in memory.
"""

# %%
# Write generated images to a folder, as a camera would.
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.pipeline import make_pipeline

from skpatchcore import ImageReader, PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import load_folder, make_anomaly_images

folder = Path(tempfile.mkdtemp())
good, _, _ = make_anomaly_images(20, image_size=64, anomaly_ratio=0.0, random_state=0)
bad, _, _ = make_anomaly_images(6, image_size=64, anomaly_ratio=1.0, random_state=1)
for name, images in (("good", good), ("defect", bad)):
    (folder / name).mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / name / f"{i:03d}.png")

# %%
# ``return_paths=True`` lists the files instead of reading them.
data = load_folder(folder / "good", folder / "defect", return_paths=True)
print(data.images[:3], data.labels[:3])

# %%
# The reader resizes to one size, so files of different sizes mix freely.
pipe = make_pipeline(
    ImageReader(image_size=64),
    PatchCoreDetector(
        feature_extractor=TorchvisionExtractor("resnet18", weights=None),
        image_size=64,
        random_state=0,
    ),
)
train = data.images[data.labels == 0][:16]
pipe.fit(train)
held_out = np.r_[data.images[data.labels == 0][16:], data.images[data.labels == 1]]
print("predictions:", pipe.predict(held_out))
