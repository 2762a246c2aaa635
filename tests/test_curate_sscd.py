"""SSCD copy-detection descriptors (Pizzi et al. 2022) in curation's dedup stage (DINOv2 App.
A.3): forward parity with a PyTorch reference of SSCD's torchvision model, reading its weight
files, and the dedup stage on the tiny demo pool with `dedup.descriptor=sscd`.

The reference is SSCD's `TV_*` model as sscd/models/model.py builds it: torchvision's ResNet, its
avgpool replaced by GeM (p = 3), `fc` the projection, then F.normalize; random weights, saved
as its state dict (`backbone.` keys), as the released `.torchvision.pt` files are.
"""
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_jax import convert
from dino_jax import curate
from dino_jax.errors import UsageError
from dino_jax.models import sscd
from tests.test_convert import relative_error
from tests.test_convert_resnet import torchvision_resnet
from tests.test_curate import backbone_run, curated, mesh  # noqa: F401  (fixtures)


class GeM(torch.nn.Module):
  """sscd/models/gem_pooling.py's GlobalGeMPool2d, the 1e-6 clamp included."""

  def __init__(self, p: float = 3.0):
    super().__init__()
    self.p = p

  def forward(self, x):
    return x.flatten(2).clamp(min=1e-6).pow(self.p).mean(dim=2).pow(1.0 / self.p)


class SSCDReference(torch.nn.Module):
  """SSCD's `Model` with a torchvision backbone: backbone (avgpool -> GeM, fc -> dim), L2 norm."""

  def __init__(self, depth: int, dim: int, seed: int = 0):
    super().__init__()
    self.backbone = torchvision_resnet(depth, seed)
    self.backbone.avgpool = GeM()
    self.backbone.fc = torch.nn.Linear(self.backbone.fc.in_features, dim)
    torch.nn.init.normal_(self.backbone.fc.bias)
    self.eval()

  def forward(self, x):
    return F.normalize(self.backbone(x))


def sscd_file(path: pathlib.Path, depth: int = 18, dim: int = 64, seed: int = 0) -> tuple[str, SSCDReference]:
  model = SSCDReference(depth, dim, seed)
  torch.save(model.state_dict(), path)
  return str(path), model


def reference_descriptors(model: SSCDReference, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("depth,dim", [(50, 512), (18, 64)])
def test_sscd_descriptor_equals_the_pytorch_model(depth, dim, tmp_path):
  file, model = sscd_file(tmp_path / "sscd.torchvision.pt", depth, dim)
  assert "backbone.fc.weight" in model.state_dict()
  module, variables = convert.read_sscd(file)
  assert (module.depth, module.dim) == (depth, dim)
  images = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
  x = sscd.preprocess(images, 64)  # at its size: ImageNet normalization only
  ours = module.apply(variables, x)
  assert relative_error(ours, reference_descriptors(model, x)) <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  assert sscd.preprocess(images, 32).shape == (2, 32, 32, 3)


def test_files_that_are_not_sscd_models_are_one_clear_error(tmp_path):
  model = torchvision_resnet(18)
  model.fc = torch.nn.Identity()
  torch.save(model.state_dict(), tmp_path / "no_fc.pth")
  with pytest.raises(UsageError, match=r"no_fc.pth: not an SSCD torchvision model .*there is no fc\)$"):
    convert.read_sscd(str(tmp_path / "no_fc.pth"))
  _, reference = sscd_file(tmp_path / "x.pt")
  state = {k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.layer4.1.")}
  torch.save(state, tmp_path / "truncated.pt")
  with pytest.raises(UsageError, match=r"not a torchvision ResNet: \[2, 2, 2, 1\] basic blocks per stage"):
    convert.read_sscd(str(tmp_path / "truncated.pt"))
  state = dict(reference.state_dict(), **{"backbone.fc.weight": torch.zeros(64, 2048)})
  torch.save(state, tmp_path / "wide_fc.pt")
  with pytest.raises(UsageError, match=r"fc.weight \(64, 2048\), fc.bias \(64,\) do not fit a projection of the 512"):
    convert.read_sscd(str(tmp_path / "wide_fc.pt"))


def sscd_config(cfg, weights: str, threshold: float = 0.99999):
  cfg = cfg.copy_and_resolve_references()
  cfg.dedup.update(descriptor="sscd", sscd_weights=weights, sscd_image_size=16, sscd_threshold=threshold,
                   sscd_eval_threshold=0.99999)
  cfg.embed.update(batch_size=256, shard_size=512)  # fewer, larger batches: seconds, not tens, on a CPU
  return cfg


def test_dedup_with_sscd_descriptors(curated, mesh, tmp_path, optimized_xla):  # noqa: F811
  cfg, out = curated
  work = pathlib.Path(shutil.copytree(out, tmp_path / "out"))
  weights, model = sscd_file(tmp_path / "sscd.torchvision.pt")
  cfg = sscd_config(cfg, weights)
  with pytest.raises(UsageError, match=r"^dedup: .*\(dedup\.threshold 0\.99999 -> \(none\); .*dedup\.descriptor "
                                       r"\(none\) -> sscd; dedup\.sscd_weights \(none\) -> .*add --restart dedup "):
    curate.run_stages(cfg, work, ["dedup"], [], mesh)
  curate.run_stages(cfg, work, list(curate.PIPELINE), ["dedup"], mesh)

  # Descriptors of the same images, row for row, as SSCD's PyTorch model computes them.
  pool, ids = curate.load_embeddings(work, "pool", "descriptors")
  assert ids == curate.load_embeddings(work, "pool")[1] and pool.shape == (len(ids), 64)
  source = curate.open_source(cfg.pool, 16)
  listing = curate.image_ids(source, cfg.pool)
  images = np.stack([source.get(listing.index(i))[0] for i in ids[:4]])
  ref = reference_descriptors(model, np.asarray(sscd.preprocess(images, 16)))
  assert relative_error(pool[:4], ref) <= 1e-4

  truth = json.loads((pathlib.Path(cfg.demo_dir) / "ground_truth.json").read_text())
  rows = map(json.loads, (work / "dropped.jsonl").read_text().splitlines())
  dropped = {pathlib.Path(r["path"]).name: r for r in rows}
  exact = {n: t for n, t in truth["pool"].items() if t.get("transform") == "exact"}
  copies = [n for n, t in exact.items() if t["kind"] == "test_copy"]
  assert copies and all(dropped[n]["matched"] == f"fashion_mnist_demo/test/{exact[n]['test_index']}" for n in copies)
  assert any(r["reason"] == "duplicate" for r in dropped.values())
  summary = json.loads((work / "summary.json").read_text())
  assert (summary["dedup_descriptor"], summary["dedup_threshold"], summary["eval_threshold"]) == ("sscd", 0.99999,
                                                                                                  0.99999)
  fingerprint = curate.read_fingerprint(work, "manifest")["dedup"]
  assert fingerprint["dedup.sscd_weights"] == str(pathlib.Path(weights).resolve())
  assert fingerprint["dedup.sscd_weights sha256"] == curate.file_digest(weights, "dedup.sscd_weights")

  # Another threshold: --restart dedup reuses the descriptors; other weights are a change to restart for.
  shards = {f: f.stat().st_mtime_ns for f in (work / "descriptors").rglob("*.npz")}
  cfg = sscd_config(cfg, weights, threshold=0.9999)
  curate.run_stages(cfg, work, ["dedup"], ["dedup"], mesh)
  assert {f: f.stat().st_mtime_ns for f in (work / "descriptors").rglob("*.npz")} == shards
  sscd_file(tmp_path / "sscd.torchvision.pt", seed=1)
  with pytest.raises(UsageError, match=r"^dedup: .*\(dedup\.sscd_weights sha256 sha256 \w+ -> sha256 \w+\); "
                                       r"add --restart dedup "):
    curate.run_stages(cfg, work, ["dedup"], [], mesh)
  curate.run_stages(cfg, work, ["dedup"], ["dedup"], mesh)
  assert not np.allclose(curate.load_embeddings(work, "pool", "descriptors")[0], pool)  # recomputed


def test_sscd_settings_are_checked(curated, mesh, tmp_path):  # noqa: F811
  cfg, out = curated
  for update, message in [(dict(descriptor="sift"), "dedup.descriptor must be one of embedding, sscd, not 'sift'"),
                          (dict(descriptor="sscd"), "dedup.descriptor=sscd needs dedup.sscd_weights"),
                          (dict(descriptor="sscd", sscd_weights=str(tmp_path / "none.pt")),
                           "dedup.sscd_weights: no file"),
                          (dict(descriptor="sscd", sscd_weights=__file__, sscd_threshold=2.0),
                           "dedup.sscd_threshold 2.0 is a cosine similarity and must be in")]:
    bad = cfg.copy_and_resolve_references()
    bad.dedup.update(update)
    with pytest.raises(UsageError, match=re.escape(message)):
      curate.run_dedup(bad, out, mesh)
