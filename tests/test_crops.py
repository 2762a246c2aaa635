"""Host-side multi-crop geometry (dino_jax.crops) against torchvision's RandomResizedCrop."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dino_jax import augment
from dino_jax import crops
from dino_jax import data

DRAWS = 4000


def box_moments(boxes, width, height):
  """Mean and std of the area fraction and log aspect ratio, and mean box centre."""
  b = np.asarray(boxes, np.float64)  # (top, left, h, w)
  area = b[:, 2] * b[:, 3] / (width * height)
  log_ratio = np.log(b[:, 3] / b[:, 2])
  cy, cx = (b[:, 0] + b[:, 2] / 2) / height, (b[:, 1] + b[:, 3] / 2) / width
  return np.array([area.mean(), area.std(), log_ratio.mean(), log_ratio.std(), cy.mean(), cx.mean()])


@pytest.mark.parametrize("width,height,scale", [(640, 480, (0.4, 1.0)), (640, 480, (0.05, 0.4)),
                                                (300, 1000, (0.32, 1.0)), (28, 28, (0.1, 0.4))])
def test_crop_parameters_follow_torchvision(width, height, scale):
  torch.manual_seed(0)
  image = Image.new("RGB", (width, height))
  ref = [transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3)) for _ in range(DRAWS)]
  rng = np.random.default_rng(0)
  ours = [crops.crop_box(rng, width, height, scale) for _ in range(DRAWS)]
  m_ref, m_ours = box_moments(ref, width, height), box_moments(ours, width, height)
  # Sampling error of 4000 draws: a few 1e-3 on these moments.
  np.testing.assert_allclose(m_ours, m_ref, atol=0.02, err_msg=f"{m_ours} vs torchvision {m_ref}")
  for top, left, h, w in ours:
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


def test_fallback_is_torchvisions_center_crop():
  """An image too elongated for any attempt falls back to the central crop at the ratio bound."""
  image = Image.new("RGB", (1000, 50))
  torch.manual_seed(0)
  ref = transforms.RandomResizedCrop.get_params(image, (0.9, 1.0), (3 / 4, 4 / 3))
  assert crops.crop_box(np.random.default_rng(0), 1000, 50, (0.9, 1.0)) == ref == (0, 466, 50, 67)


def photo(width=640, height=480) -> Image.Image:
  """A 4:3 image whose left and right quarters differ from its centre (a colour ramp)."""
  x = np.linspace(0, 255, width)[None, :, None]
  y = np.linspace(0, 255, height)[:, None, None]
  return Image.fromarray(np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                         np.full((height, width, 1), 128.0)], -1).astype(np.uint8))


def test_views_come_from_the_whole_image_not_its_center_square():
  """On a 4:3 photo, crops reach into the quarter a centre square would cut off."""
  specs = [crops.CropSpec(32, (0.05, 0.4))] * 8
  lowest, highest = 255, 0
  for position in range(40):
    for view in crops.views(photo(), crops.view_rng(0, 0, position), specs, data.to_rgb):
      assert view.shape == (32, 32, 3) and view.dtype == np.uint8
      lowest, highest = min(lowest, view[..., 0].min()), max(highest, view[..., 0].max())
  # Red is the horizontal ramp 0..255: the centre 480 px square holds only 32..223.
  assert lowest < 16 and highest > 240


def test_views_are_a_function_of_seed_step_position():
  specs = [crops.CropSpec(24, (0.4, 1.0))] * 2 + [crops.CropSpec(12, (0.05, 0.4))] * 2
  make = lambda *key: crops.views(photo(), crops.view_rng(*key), specs, data.to_rgb)
  for a, b in zip(make(1, 5, 3), make(1, 5, 3)):
    np.testing.assert_array_equal(a, b)
  for key in ((2, 5, 3), (1, 6, 3), (1, 5, 4)):
    assert not all(np.array_equal(a, b) for a, b in zip(make(1, 5, 3), make(*key)))


def test_large_jpeg_is_decoded_at_reduced_size_when_the_crops_allow(monkeypatch):
  buffer = io.BytesIO()
  photo(2048, 1536).save(buffer, "JPEG", quality=95)
  sizes = []
  original_resize = Image.Image.resize

  def resize(self, *args, **kwargs):
    sizes.append(self.size)
    return original_resize(self, *args, **kwargs)
  monkeypatch.setattr(Image.Image, "resize", resize)
  specs = [crops.CropSpec(64, (0.4, 1.0))] * 2  # every crop >= 0.4 of 2048x1536: >= 4x its 64 px
  with Image.open(io.BytesIO(buffer.getvalue())) as im:
    views = crops.views(im, np.random.default_rng(0), specs, data.to_rgb)
  assert sizes and all(s[0] <= 1024 for s in sizes)  # decoded at 1/2 or less
  assert all(v.shape == (64, 64, 3) for v in views)
  w, h = crops.draft_size([(0, 0, 100, 200)], [50], 2048, 1536)  # the box may shrink 2x
  assert (w, h) == (1024, 768)
  assert crops.draft_size([(0, 0, 40, 40)], [64], 2048, 1536) == (2048, 1536)  # upsampled crop: full size


def test_eval_view_is_resize_256_center_crop_224():
  """DINO/DINOv2 evaluation: shorter side to 256, centre 224 crop (proportional for other sizes)."""
  image = np.asarray(photo(320, 240))
  square = data.to_square_rgb(image, 256)[None]
  view = np.asarray(augment.preprocess_eval(square, 224))
  ref = np.asarray(Image.fromarray(image).resize((341, 256), Image.BICUBIC))[16:240, 58:282]
  ref = (ref / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
  np.testing.assert_allclose(view[0], ref, atol=0.03)
  assert math.isclose(round(28 * augment.EVAL_RESIZE), 32)
