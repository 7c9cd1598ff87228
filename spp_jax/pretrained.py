"""A pretrained SPP-net and the one way to load it: :class:`Pretrained`, :func:`load_pretrained`.

Transfer classification and detection both start from a network trained on a
classification task. :func:`load_pretrained` accepts it as

* a ``make train`` workdir (``config.json``, orbax ``checkpoints/``, optionally
  ``mean_image.npy``): its latest checkpoint, read only; or
* a Flax msgpack file of SPPNet variables with a JSON sidecar ``<file>.json``
  (:func:`save_pretrained` writes both). The sidecar says which network the arrays
  belong to: ``arch``, ``width``, ``fc_dim``, ``num_classes`` and optionally ``spp``
  (true), ``levels`` ([6, 3, 2, 1]), ``input_scale`` (1.0), ``input_norm``
  ("none"), ``pool_mode`` ("appendix_a") and ``mean`` (a number or 3 numbers,
  0..255). On load the arrays are checked against that network (names, shapes,
  finite values), so a wrong sidecar is a one-line
  :class:`~spp_jax.errors.UserError`, not a failure deep inside feature extraction.

Nothing here trains: the detection experiment pretrains a backbone itself when it
is given none (``experiments/voc_det.py``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import atomic
from spp_jax.errors import CheckpointMismatch, NoCheckpoint, UserError
from spp_jax.models import SPPNet, get_model, random_variables

log = logging.getLogger(__name__)

__all__ = ["MEAN_CHOICES", "PAPER_MEAN", "Pretrained", "check_pretrained_path", "load_pretrained", "random_pretrained",
           "read_workdir", "save_pretrained"]

# Appendix A: transfer (VOC 2007 classification, Caltech101) and detection subtract a
# constant 128 from every pixel, not the ImageNet mean image.
PAPER_MEAN = 128.0
MEAN_CHOICES = ("constant", "image")
_SIDECAR_REQUIRED = ("arch", "width", "fc_dim", "num_classes")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A trained network ready to serve.

    Attributes:
      model: the :class:`~spp_jax.models.SPPNet`.
      variables: its ``{"params": ...}``.
      mean: the mean it was trained with, 0..255 units: a (Hm, Wm, 3) mean image, a (3,)
        colour, a scalar, or None when unknown.
      description: one line for logs and tables (where it came from, what it is).
      trained_on: the training dataset's name when known ("shapes", "shapes_wide", "imagenet2012"), else "".
    """

    model: SPPNet
    variables: Any
    mean: np.ndarray | None
    description: str
    trained_on: str = ""

    def serving_mean(self, choice: str = "constant") -> np.ndarray:
        """The mean to subtract before the conv layers.

        ``"constant"``: 128, the paper's rule for transfer and detection (Appendix A).
        ``"image"``: the training mean (a mean image is warped to each input, as in
        training); 128, with a warning, when this network's mean is unknown.
        """
        if choice not in MEAN_CHOICES:
            raise UserError(f"unknown mean {choice!r}; valid: {', '.join(MEAN_CHOICES)}")
        if choice == "image" and self.mean is not None:
            return np.asarray(self.mean, np.float32)
        if choice == "image":
            log.warning("%s: no training mean known, subtracting the constant %g", self.description, PAPER_MEAN)
        return np.asarray(PAPER_MEAN, np.float32)


def load_pretrained(path: str) -> Pretrained:
    """A ``make train`` workdir (a directory) or a msgpack file with its JSON sidecar; see the module doc."""
    if not path or not os.path.exists(path):
        raise UserError(f"pretrained network {path!r} does not exist: give a `make train` workdir (e.g. "
                        f"`make train MODEL=zf5 WORKDIR=runs/zf5`, then runs/zf5) or a .msgpack file with "
                        f"its .json sidecar")
    return _from_workdir(path) if os.path.isdir(path) else _from_msgpack(path)


def check_pretrained_path(path: str) -> None:
    """Cheap checks that ``path`` looks loadable by :func:`load_pretrained`, without reading arrays.

    Run before any data work: the path exists; a workdir has a readable config.json and a
    non-empty ``checkpoints/``; a file has a JSON sidecar naming a buildable network.  The
    arrays themselves are verified when they are loaded.  Raises a one-line UserError.
    """
    if not path or not os.path.exists(path):
        load_pretrained(path)  # its "does not exist" error
    if not os.path.isdir(path):
        sidecar = path + ".json"
        _model_from_sidecar(_read_sidecar(path), sidecar)
        return
    from spp_jax.train.config import load_config

    try:
        load_config(path)
    except FileNotFoundError:
        raise UserError(f"{os.path.abspath(path)} has no config.json: is it a `make train` workdir?") from None
    ckpts = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpts) or not os.listdir(ckpts):
        raise NoCheckpoint(f"no checkpoints in {path}: train first (make train WORKDIR={path})")


def random_pretrained(arch: str = "zf5", *, width: float = 0.25, fc_dim: int = 512, num_classes: int = 11,
                      seed: int = 0) -> Pretrained:
    """A **randomly initialised** network (He kernels, zero biases): measures a pipeline, not SPP-net."""
    log.warning("NO CHECKPOINT: using a RANDOMLY INITIALISED %s (width %.2f, fc %d); the numbers "
                "measure the pipeline, not SPP-net", arch, width, fc_dim)
    model = get_model(arch, num_classes=num_classes, width=width, fc_dim=fc_dim)
    return Pretrained(model, random_variables(model, seed), None, f"random {arch} width {width}")


# ---- make train workdirs ------------------------------------------------------------------


def _from_workdir(workdir: str) -> Pretrained:
    from spp_jax.train.config import build_model, load_config, trained_num_classes

    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise UserError(f"{workdir} has no config.json: is it a `make train` workdir?")
    cfg = load_config(workdir)
    model = build_model(cfg, trained_num_classes(cfg))
    variables, meta = read_workdir(workdir, cfg, model)
    mean_path = os.path.join(workdir, "mean_image.npy")
    mean = np.load(mean_path) if os.path.exists(mean_path) else None
    return Pretrained(model, variables, mean, f"{workdir} ({cfg.model} width {cfg.width}, trained "
                                              f"{meta.get('epoch')} epochs on {cfg.dataset})", cfg.dataset)


def read_workdir(workdir: str, cfg, model: SPPNet) -> tuple[dict, dict]:
    """``({"params": ...}, meta)`` of the newest intact checkpoint of a ``make train`` workdir.

    The one place anything but the training loop reads a workdir's checkpoints (``make
    eval`` too), and it only reads: nothing in the workdir is written, moved, deleted or
    cleaned, so it is safe while a trainer runs there.  ``cfg`` must describe the net the
    workdir trained: keys outside ``spp_jax.train.workdir.RESUMABLE_KEYS`` that differ from
    its config.json raise CheckpointMismatch before anything is read.  The checkpoint is
    verified by ``spp_jax.train.checkpoint.read_checkpoint`` (shapes and dtypes, SHA-256
    checksums, finite values; a corrupt newest one is skipped with a warning).
    """
    from spp_jax.train.checkpoint import read_checkpoint
    from spp_jax.train.config import load_config
    from spp_jax.train.state import create_state, optimizer_from_config
    from spp_jax.train.workdir import config_changes

    if os.path.exists(os.path.join(workdir, "config.json")):
        changes = config_changes(load_config(workdir), cfg)
        if changes:
            raise CheckpointMismatch(
                f"{workdir} was trained with another config ({'; '.join(changes)}): a trained "
                f"workdir is read with its own config.json; drop those overrides (only keys such as "
                f"protocols, eval_limit, eval_batch_size may differ)")
    tx = optimizer_from_config(cfg, 1)
    side = min(cfg.sizes)
    # The whole train state (optimizer included): the checksums cover every array.
    abstract = jax.eval_shape(
        lambda k: create_state(model.init(k, jnp.zeros((1, side, side, 3)))["params"], tx), jax.random.key(0))
    try:
        state, meta, step = read_checkpoint(os.path.join(workdir, "checkpoints"), abstract)
    except NoCheckpoint:
        raise NoCheckpoint(f"no checkpoints in {workdir}: train first (make train WORKDIR={workdir})") from None
    log.info("restored checkpoint %d (epoch %s) of %s", step, meta.get("epoch"), workdir)
    return {"params": state.params}, meta


# ---- msgpack + JSON sidecar ---------------------------------------------------------------


def save_pretrained(path: str, model: SPPNet, variables: Any, mean=None) -> None:
    """Write ``variables`` as Flax msgpack and the ``<path>.json`` sidecar :func:`load_pretrained` reads.

    ``mean``: the training mean as a number or 3 numbers (0..255), or None.
    """
    import flax.serialization

    if mean is not None and np.size(mean) not in (1, 3):
        raise UserError(f"the sidecar stores a mean of 1 or 3 numbers, got shape {np.shape(mean)}")
    sidecar = {"arch": model.arch, "width": model.width, "fc_dim": model.fc_dim,
               "num_classes": model.num_classes, "spp": model.spp, "levels": list(model.levels),
               "input_scale": model.input_scale, "input_norm": model.input_norm,
               "pool_mode": model.pool_mode,
               "mean": None if mean is None else np.asarray(mean, float).ravel().tolist()}
    for target, blob in ((path, flax.serialization.to_bytes(variables)),
                         (path + ".json", json.dumps(sidecar, indent=1).encode())):
        atomic.write_bytes(target, blob)  # never a half-written network


def _read_sidecar(path: str) -> dict:
    sidecar = path + ".json"
    if not os.path.exists(sidecar):
        raise UserError(f"the JSON sidecar {sidecar!r} of {path!r} is missing: it names the network the "
                        f"arrays belong to ({', '.join(_SIDECAR_REQUIRED)}); save_pretrained writes both")
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{sidecar} is not readable JSON ({e})") from None
    missing = [k for k in _SIDECAR_REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{sidecar} lacks {', '.join(missing)}")
    return meta


def _model_from_sidecar(meta: dict, sidecar: str) -> SPPNet:
    try:
        # input_scale matters: the embedded preset's nets expect images scaled by 1/58.
        return get_model(meta["arch"], num_classes=int(meta["num_classes"]), width=float(meta["width"]),
                         fc_dim=int(meta["fc_dim"]), spp=bool(meta.get("spp", True)),
                         levels=tuple(int(n) for n in meta.get("levels", (6, 3, 2, 1))),
                         input_scale=float(meta.get("input_scale", 1.0)),
                         input_norm=str(meta.get("input_norm", "none")),
                         pool_mode=str(meta.get("pool_mode", "appendix_a")))
    except (TypeError, ValueError) as e:
        raise UserError(f"{sidecar}: {e}") from None


def _from_msgpack(path: str) -> Pretrained:
    import flax.serialization
    import flax.traverse_util

    meta = _read_sidecar(path)
    model = _model_from_sidecar(meta, path + ".json")
    try:
        with open(path, "rb") as f:
            raw = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not such a file"
        raise UserError(f"{path} is not a Flax msgpack file of SPPNet variables "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    got = flax.traverse_util.flatten_dict(raw, sep="/") if isinstance(raw, dict) else {}
    need = flax.traverse_util.flatten_dict(want, sep="/")
    _check_arrays(got, need, path, meta)
    variables = flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(np.asarray(v), need[k].dtype) for k, v in got.items()}, sep="/")
    mean = meta.get("mean")
    mean = None if mean is None else np.asarray(mean, np.float32)
    return Pretrained(model, variables, mean, f"{path} ({meta['arch']} width {meta['width']})")


def _check_arrays(got: dict, need: dict, path: str, meta: dict) -> None:
    """Names, shapes and finiteness of the msgpack's arrays against the sidecar's network."""
    problems = [f"{k} is missing" for k in need if k not in got]
    problems += [f"{k} is not part of that network" for k in got if k not in need]
    for k in need:
        if k in got:
            a = np.asarray(got[k])
            if a.shape != need[k].shape:
                problems.append(f"{k} has shape {a.shape}, that network needs {need[k].shape}")
            elif not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                problems.append(f"{k} is not finite floating point ({a.dtype})")
    if problems:
        net = f"{meta['arch']} width {meta['width']}, fc_dim {meta['fc_dim']}, {meta['num_classes']} classes"
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path} does not match its sidecar {path}.json ({net}): "
                        + "; ".join(problems[:3]) + more
                        + ". Fix the sidecar, or write both again with spp_jax.pretrained.save_pretrained")
