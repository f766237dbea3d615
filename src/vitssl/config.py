"""Typed configuration: dataclass schema + YAML recipes + ``key=value`` overrides (OmegaConf).

A run is described by one :class:`Config`. Recipes (shipped in ``vitssl/recipes``) are small YAML deltas over the
defaults below (a recipe may name another with ``_base_: other.yaml``); command-line overrides come last.
The ``objective`` block is typed by the objective that registers it (``vitssl.ssl``), so its keys are
checked like every other key. Unknown keys and wrong types fail naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitssl.errors import UserError
from vitssl.io import atomic_write
from vitssl.registry import OBJECTIVES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Recipes ship inside the package (``vitssl/recipes``), so a wheel install finds them by name from any folder.
CONFIG_DIR = Path(str(importlib.resources.files("vitssl") / "recipes"))


class ConfigError(UserError, ValueError):
    """A configuration the user wrote is wrong; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"  # backbone registry key; `vitssl backbones` lists them
    # extra keyword arguments for create_backbone (null means "the model's default"); img_size defaults
    # to data.img_size
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = "imagefolder"  # dataset registry key: imagefolder, cifar10, cifar100, digits, shapes, ...
    root: str | None = None  # folder or file the dataset reads; null for generated datasets
    split: str = "train"  # split inside root (imagefolder: a subfolder if present)
    kwargs: dict[str, Any] = field(default_factory=dict)  # dataset-specific options (e.g. num_samples)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None  # labelled held-out split for the online k-NN monitor; null = none
    img_size: int = 224  # network input resolution in pixels (crop size)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per-channel normalisation
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    num_workers: int = 8  # data-loading processes per training process (0 = load in the main process)
    skip_corrupt: bool = False  # skip (and count) undecodable images instead of stopping with an error
    # where MoCo v3's photometric augmentations run: cpu (in the loader workers), gpu (batched on the training
    # device, the workers only decode and crop), auto (gpu when training on CUDA, else cpu)
    augment_device: str = "auto"


@dataclass
class TrainConfig:
    epochs: int = 100  # passes over data.train
    batch_size: int = 256  # GLOBAL batch per optimizer step (all ranks × accumulation steps)
    accum_steps: int = 1  # gradient-accumulation micro-steps per optimizer step
    checkpoint_every_steps: int = 1000  # optimizer steps between checkpoints (and one at each epoch end)
    keep_last: int = 2  # step checkpoints kept besides checkpoint_last.pth
    stop_after_steps: int | None = None  # stop exactly as a preemption would (schedules unchanged)
    log_every_steps: int = 10  # optimizer steps between metrics lines
    # log grad_norm: the global L2 norm of the gradients each optimizer step takes, before clipping (optim.clip_grad
    # logs it anyway); computed every step, written at the metrics lines
    log_grad_norm: bool = False
    compile: bool = False  # torch.compile the objective (opt-in)
    # ddp: every rank holds the whole model, optimizer state and gradients | fsdp: PyTorch FSDP2 shards them over
    # the ranks, block by block (vitssl.engine.parallel), and checkpoints are sharded (torch.distributed.checkpoint)
    strategy: str = "ddp"
    # recompute each transformer block's activations in the backward pass instead of storing them: about one
    # block's activations per sample kept instead of all of them, for about a third more compute
    activation_checkpointing: bool = False
    # train.strategy=fsdp: dtype the sharded fp32 weights are gathered in (auto: bf16 when the run autocasts to
    # bf16, else fp32); gradients are always reduced in fp32
    fsdp_param_dtype: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam (L2 decay in the gradient) | sgd | lars
    lr: float = 1.5e-4  # peak learning rate (per 256 images when lr_scaling=linear)
    lr_scaling: str = "linear"  # linear: lr × train.batch_size / 256 (MoCo v3, MAE); none: lr as given
    min_lr: float = 0.0  # final learning rate of the cosine schedule
    warmup_epochs: float = 0.0  # linear warm-up from 0 to the peak lr, in epochs (per iteration)
    warmup_steps: int | None = None  # warm-up in optimizer steps instead (open_clip: 10k); overrides epochs
    weight_decay: float = 0.1  # initial weight decay
    # true: no decay on norms, biases, tokens, position embeddings and what the backbone's no_weight_decay()
    # names (timm's rule); false: every trainable parameter decays (the official MoCo v3 code's AdamW)
    weight_decay_filter: bool = True
    weight_decay_end: float | None = None  # final weight decay of a cosine schedule; null = constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon (open_clip's ViT recipes: 1e-6)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.001  # LARS trust coefficient
    clip_grad: float | None = None  # max global gradient L2 norm; null = no clipping


@dataclass
class EvalConfig:
    knn_every_epochs: int = 0  # online k-NN monitor on data.val every N epochs (0 = off)
    knn_k: int = 20  # neighbours
    knn_temperature: float = 0.07  # vote weight exp(sim / T)
    knn_max_train: int = 20000  # memory-bank size cap (first N samples of data.train)
    knn_batch_size: int = 256  # feature-extraction batch size per process


@dataclass
class LaunchConfig:
    backend: str = "local"  # local | slurm (`launch=slurm` on the command line sets this)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # processes per node; default gpus_per_node, or 1 on CPU
    cpus_per_task: int = 4
    mem_gb: int | None = None  # memory per node in GB; null = the partition's default
    partition: str | None = None
    timeout_min: int = 60  # SLURM time limit in minutes; the job requeues when it is reached
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 90  # seconds before the time limit at which USR2 asks the job to checkpoint
    max_requeue: int = 3  # time-limit requeues before the job gives up (preemptions are unlimited)
    # shell lines run before srun (module load ...); write $VAR, not ${VAR} (OmegaConf interpolation)
    setup: list[str] = field(default_factory=list)
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options
    folder: str | None = None  # submitit folder; default <output_dir>/submitit
    dry_run: bool = False  # print the sbatch script instead of submitting


@dataclass
class ObjectiveConfig:
    """Base of every objective's config block; each objective subclasses it with its own fields."""

    name: str = "moco_v3"  # objective registry key


@dataclass
class Config:
    output_dir: str = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints
    seed: int = 0
    resume: str = "auto"  # auto: newest good checkpoint in output_dir | a checkpoint path | none
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = None  # typed by the objective named in objective.name
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    meta: dict[str, Any] = field(default_factory=dict)  # written by the run: git SHA, version, time


_CHOICES = {
    "resume": None,
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "optim.name": ("adamw", "adam", "sgd", "lars"),
    "optim.lr_scaling": ("linear", "none"),
    "launch.backend": ("local", "slurm"),
    "train.strategy": ("ddp", "fsdp"),
    "train.fsdp_param_dtype": ("auto", "fp32", "bf16"),
}


def _objective_config_class(name: str) -> type:
    return OBJECTIVES.get(name).Config  # the first lookup imports the objective packages


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (shipped recipes: `vitssl recipes`)")
    if path in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / base).resolve(), (*seen, path))
    return OmegaConf.to_container(OmegaConf.merge(parent, data))  # type: ignore[return-value]


def resolve_config_path(name: str | Path) -> Path:
    """Find a recipe: a path, or a name of a shipped recipe (``pretrain/mocov3_demo``; ``.yaml`` optional).

    ``configs/pretrain/x.yaml``, the path recipes had inside the repository before they moved into the package,
    still names the shipped recipe ``pretrain/x`` when no such file exists where the command runs.
    """
    path = Path(name)
    shipped = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    candidates = [path, path.with_suffix(".yaml")]
    for rel in dict.fromkeys([path, shipped]):
        if not rel.is_absolute():
            candidates += [CONFIG_DIR / rel, (CONFIG_DIR / rel).with_suffix(".yaml")]
    candidates = list(dict.fromkeys(candidates))  # "x.yaml" tried once
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"recipe {str(name)!r} not found: no such file, and no shipped recipe of that name; "
        f"shipped recipes: {', '.join(list_recipes())}"
    )


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``pretrain/mocov3_demo``, ...), sorted."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _delete_key(user: DictConfig, key: str) -> None:
    """Remove ``key`` (dotted) from the recipe's mapping: ``~key`` on the command line."""
    *parents, leaf = key.split(".")
    node: Any = user
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig) or leaf not in node:
        raise ConfigError(f"~{key}: the recipe sets no key '{key}', so there is nothing to delete")
    del node[leaf]


def _split_deletions(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``~key`` deletions (applied to the recipe first) and ``key=value`` settings."""
    deletions = [o[1:] for o in overrides if o.startswith("~")]
    for key in deletions:
        if not key or "=" in key:
            raise ConfigError(
                f"override '~{key}' must look like ~key (delete a recipe key), e.g. ~model.backbone_kwargs"
            )
    return deletions, [o for o in overrides if not o.startswith("~")]


def _parse_overrides(overrides: list[str]) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. optim.lr=3e-4), or ~key to delete a recipe key"
            )
        key, value = item.split("=", 1)
        if key == "launch":  # `launch=slurm` is shorthand for launch.backend=slurm
            key = "launch.backend"
        items.append(f"{key}={value}")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None


def _check_keys(user: Any, schema: Any, prefix: str = "") -> None:
    """Fail on keys the schema does not have, naming the closest valid key; free-form dicts are skipped."""
    if not isinstance(user, DictConfig) or not isinstance(schema, DictConfig):
        return
    if OmegaConf.get_type(schema) in (dict, None) and not dataclasses.is_dataclass(OmegaConf.get_type(schema)):
        return  # free-form mapping (backbone_kwargs, dataset kwargs, sbatch_extra)
    valid = list(schema.keys())
    for key in user:
        full = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.4)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} Valid keys here: {', '.join(map(str, valid))}")
        sub_schema = schema._get_node(key)
        if isinstance(sub_schema, DictConfig) and sub_schema._is_none():
            # an optional sub-config (data.val): check against its type's fields
            obj_type = sub_schema._metadata.ref_type
            if dataclasses.is_dataclass(obj_type):
                _check_keys(user[key], OmegaConf.structured(obj_type), f"{full}.")
            continue
        _check_keys(user[key], sub_schema, f"{full}.")


def _check_choices(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; valid values: {', '.join(choices)}")
    resume = cfg.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(f"resume={resume!r}: no such checkpoint file (use auto, none or a path)")
    if cfg.train.batch_size <= 0 or cfg.train.accum_steps <= 0:
        raise ConfigError("train.batch_size and train.accum_steps must be positive")


def build_config(user: dict[str, Any] | DictConfig, check_files: bool = True) -> DictConfig:
    """Validate a user mapping against the schema and return the resolved, typed config.

    Args:
        user: the merged YAML + overrides (plain mapping).
        check_files: also check that paths such as ``resume`` exist.
    """
    user_cfg = user if isinstance(user, DictConfig) else OmegaConf.create(user)
    objective_name = OmegaConf.select(user_cfg, "objective.name", default=ObjectiveConfig.name)
    try:
        objective_cls = _objective_config_class(objective_name)
    except KeyError as err:
        raise ConfigError(f"objective.name: {err}") from None
    schema = OmegaConf.structured(Config)
    schema.objective = OmegaConf.structured(objective_cls)
    _check_keys(user_cfg, schema)
    try:
        cfg = OmegaConf.merge(schema, user_cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).strip().splitlines()[0]  # OmegaConf adds its own context lines
        expected = OmegaConf.select(schema, key, default=None) if key != "?" else None
        if isinstance(expected, DictConfig):
            hint = f"; it is a mapping: clear the recipe's with ~{key}, or set one entry with {key}.NAME=VALUE"
        elif expected is not None:
            hint = f"; expected a {type(expected).__name__} like {expected!r}"
        else:
            hint = ""
        raise ConfigError(f"config key '{key}': {message}{hint}") from None
    if check_files:
        _check_choices(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg  # type: ignore[return-value]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Resolve a recipe and ``key=value`` overrides into a validated config.

    Args:
        path: a YAML recipe (path, or a shipped recipe's name); None for the defaults only.
        overrides: ``key=value`` strings applied last (``launch=slurm`` is ``launch.backend=slurm``); ``~key``
            deletes a key the recipe sets, before the settings apply (``~model.backbone_kwargs``: the backbone's
            own defaults).
    """
    deletions, settings = _split_deletions(list(overrides or []))
    user = OmegaConf.create(_read_yaml(resolve_config_path(path)) if path is not None else {})
    for key in deletions:
        _delete_key(user, key)
    user = OmegaConf.merge(user, _parse_overrides(settings))
    return build_config(user)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain-dict copy of a config (picklable, storable in checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_container(data: dict[str, Any]) -> DictConfig:
    """Rebuild a validated config from :func:`to_container`'s output (e.g. read from a checkpoint)."""
    return build_config(data, check_files=False)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))


def config_to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
