"""The models kd-ddp trains, by name (`model.teacher`, `model.student`):

- `teacher_cnn`, `teacher_cnn_lite`, `student_cnn`: the seed's CNNs (`ConvNet` below),
  sized by `model.<role>_width` / `_hidden` and `model.dropout`.
- `torchvision:<name>`: any torchvision classification builder, built by
  `torchvision.models.get_model(name, weights=None, num_classes=K, **model.<role>_kwargs)`:
  random initial weights, never a download. With the CIFAR stem (`model.cifar_stem`, on by
  default for images of at most 64 px) the first conv becomes 3x3 with stride 1 and a
  max-pool right after it is removed, the usual adaptation of ImageNet CNNs to 32x32 inputs.
- `<module.path>:<callable>`: the user's own code. Its top-level module is looked up first
  in the directories of `model.python_path`, which are added at the end of `sys.path` for
  its own imports (in every process that builds a model: each torchrun rank, each Slurm
  task), so that a file there never stands in for a package kd-ddp imports; the callable
  is called as `callable(num_classes=K, **model.<role>_kwargs)` and must return an `nn.Module`.

Every model `build_model` returns has been checked: on a batch of two images of the data's
size it gives a `[2, num_classes]` tensor, in training and in evaluation mode (the check
changes neither its weights, its buffers nor the random streams). What goes wrong is a
`ConfigError` naming the model and the cause, which the CLI prints without a traceback.

Seed CNN: a block is `convs` x (3x3 conv, BatchNorm, ReLU) followed by 2x2 max-pooling;
the width doubles per block. The classifier is flatten -> hidden -> ReLU -> dropout -> classes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kd_ddp.config import SEED_MODELS, Config, ConfigError, model_kind
from kd_ddp.stages import TEACHER_ROLE


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes a conv bias redundant.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    def __init__(self, *, blocks: int, convs: int, width: int, hidden: int, num_classes: int,
                 image_size: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for b in range(blocks):
            cout = width * 2**b
            for c in range(convs):
                layers += _conv_bn_relu(cin if c == 0 else cout, cout)
            layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        side = image_size // 2**blocks
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# name -> (blocks, convs per block); the names are listed in config.SEED_MODELS
ARCHITECTURES = {
    "teacher_cnn": (3, 2),
    "teacher_cnn_lite": (3, 1),
    "student_cnn": (2, 1),
}
assert set(ARCHITECTURES) == set(SEED_MODELS)


# -- what a name means ----------------------------------------------------------------


def model_name(cfg: Config, role: str) -> str:
    return cfg.model.teacher if role == TEACHER_ROLE else cfg.model.student


def model_kwargs(cfg: Config, role: str) -> dict[str, Any]:
    """`model.<role>_kwargs` as a dict (validate() has checked it is a JSON object)."""
    text = cfg.model.teacher_kwargs if role == TEACHER_ROLE else cfg.model.student_kwargs
    return json.loads(text) if text.strip() else {}


def uses_cifar_stem(cfg: Config, role: str) -> bool:
    """Whether a torchvision model of this role gets the CIFAR stem: `model.cifar_stem`, whose
    `auto` means on for images of at most 64 px where the model has a stride-2 stem."""
    name = model_name(cfg, role)
    if model_kind(name) != "torchvision" or cfg.model.cifar_stem == "false":
        return False
    if cfg.model.cifar_stem == "true":
        return True
    return cfg.data.image_size <= 64 and has_stride2_stem(name, json.dumps(model_kwargs(cfg, role), sort_keys=True))


@functools.cache
def has_stride2_stem(name: str, kwargs_json: str) -> bool:
    """Whether torchvision model `name`'s first conv has stride 2 (the stems the CIFAR stem
    adapts), read from a build on the meta device (no memory, no initialization), or on the
    CPU for the builders that cannot build there; False for a name or kwargs that do not build
    (the real build says why)."""
    import torchvision

    arch, kwargs = name.partition(":")[2], json.loads(kwargs_json)
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except NotImplementedError:  # an initializer that reads values (RegNet)
        with torch.random.fork_rng(devices=[]):
            model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception:
        return False
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first is not None and first.stride == (2, 2)


def architecture(cfg: Config, role: str) -> Any:
    """What a checkpoint of this role must have been made with: the seed CNN's name and
    sizes (as every earlier kd-ddp checkpoint records them), else the name, its keyword
    arguments and, for torchvision, whether it has the CIFAR stem."""
    name = model_name(cfg, role)
    m = cfg.model
    if model_kind(name) == "seed":
        return [name, getattr(m, f"{role}_width"), getattr(m, f"{role}_hidden"), m.dropout]
    arch: dict[str, Any] = {"arch": name, "kwargs": model_kwargs(cfg, role)}
    if model_kind(name) == "torchvision":
        arch["cifar_stem"] = uses_cifar_stem(cfg, role)
    return arch


def describe(cfg: Config, role: str) -> str:
    """`torchvision:resnet18 (CIFAR stem)`, `student_cnn (width 16, hidden 256)`, ..."""
    name = model_name(cfg, role)
    if model_kind(name) == "seed":
        return f"{name} (width {getattr(cfg.model, f'{role}_width')}, hidden {getattr(cfg.model, f'{role}_hidden')})"
    kwargs = model_kwargs(cfg, role)
    parts = [json.dumps(kwargs, sort_keys=True)] if kwargs else []
    parts += ["CIFAR stem"] if uses_cifar_stem(cfg, role) else []
    return name + (f" ({', '.join(parts)})" if parts else "")


# -- building -------------------------------------------------------------------------


def build_model(cfg: Config, role: str, num_classes: int) -> nn.Module:
    """The model of `role` ("teacher" or "student") for `num_classes`, checked (see the module doc)."""
    name = model_name(cfg, role)
    try:
        kind = model_kind(name)
        if kind == "seed":
            model = _build_seed(cfg, role, name, num_classes)
        elif kind == "torchvision":
            model = _build_torchvision(name, num_classes, model_kwargs(cfg, role), cfg.model.cifar_stem,
                                       uses_cifar_stem(cfg, role))
        else:
            model = _build_user(name, num_classes, model_kwargs(cfg, role), cfg.model.python_path)
        check_output(model, name, num_classes, cfg.data.image_size, cfg.train.channels_last)
    except ConfigError as e:
        raise ConfigError(f"model.{role}: {e}") from None
    return model


def _build_seed(cfg: Config, role: str, name: str, num_classes: int) -> nn.Module:
    m = cfg.model
    blocks, convs = ARCHITECTURES[name]
    if cfg.data.image_size % 2**blocks:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be divisible by {2**blocks} for {name}")
    return ConvNet(blocks=blocks, convs=convs, width=getattr(m, f"{role}_width"),
                   hidden=getattr(m, f"{role}_hidden"), num_classes=num_classes,
                   image_size=cfg.data.image_size, dropout=m.dropout)


def torchvision_classifiers() -> list[str]:
    """The names torchvision's classification builders answer to (`resnet18`, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _build_torchvision(name: str, num_classes: int, kwargs: dict[str, Any], setting: str, stem: bool) -> nn.Module:
    import difflib

    import torchvision

    arch = name.partition(":")[2]
    known = torchvision_classifiers()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join('torchvision:' + c for c in close)}?)" if close else ""
        raise ConfigError(f"{name!r} is not a torchvision classification model{hint}; "
                          "torchvision.models.list_models(module=torchvision.models) lists them")
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except Exception as e:  # a keyword the builder does not take, a value it refuses
        raise ConfigError(f"building {name} with {kwargs or 'no keyword arguments'} failed: "
                          f"{type(e).__name__}: {e}") from None
    if stem:
        apply_cifar_stem(model, name, required=setting == "true")
    return model


def apply_cifar_stem(model: nn.Module, name: str, required: bool) -> bool:
    """The CIFAR stem, in place: the first conv (when it has stride 2) becomes 3x3 with stride
    1, and a max-pool between it and the next conv becomes an identity; a stem conv larger
    than 3x3 is replaced by a new 3x3 one, initialized as torchvision's ResNets initialize
    their convs. A model whose first conv has another stride (a ViT's patches, ConvNeXt's
    4x4 patchify) keeps its stem, or is refused when `required` (model.cifar_stem=true).
    Returns whether the stem was changed."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs or convs[0][1].stride != (2, 2):
        if required:
            found = f"its first conv has stride {convs[0][1].stride}" if convs else "it has no Conv2d"
            raise ConfigError(f"model.cifar_stem=true: {name} has no stride-2 stem to adapt ({found}); "
                              "use model.cifar_stem=false or auto")
        return False
    first_name, first = convs[0]
    if first.kernel_size == (3, 3):
        first.stride = (1, 1)
    else:
        conv = nn.Conv2d(first.in_channels, first.out_channels, 3, stride=1, padding=1, bias=first.bias is not None)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        _replace(model, first_name, conv)
    after = list(dict(model.named_modules()))
    start, end = after.index(first_name), after.index(convs[1][0]) if len(convs) > 1 else len(after)
    for module_name in after[start + 1:end]:
        if isinstance(model.get_submodule(module_name), nn.MaxPool2d):
            _replace(model, module_name, nn.Identity())
    return True


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_python_path(dirs: list[str]) -> list[str]:
    """`model.python_path`'s directories as absolute paths, appended to sys.path (once each)
    so that the user's module can import its own files. Appended, not put first: a `wandb.py`
    or `yaml.py` in such a directory must not replace the package of that name that kd-ddp
    imports later (or that the user's module imports); the user's own top-level module is
    looked up in them first (`_import_user_module`)."""
    entries = []
    for d in dirs:
        path = Path(d).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.python_path: {d} is not a directory")
        entries.append(str(path.resolve()))
        if entries[-1] not in sys.path:
            sys.path.append(entries[-1])
    return entries


def _import_user_module(module_name: str, dirs: list[str]) -> ModuleType:
    """`module_name` with its top-level module or package taken from the first of `dirs` that
    holds it (before any installed one of that name), else as Python finds it. A top-level
    module of the user's that has the name of an installed one is used here and then dropped
    from sys.modules, so that kd-ddp's own import of that name still gets the installed one."""
    top = module_name.partition(".")[0]
    spec = None if top in sys.modules else importlib.machinery.PathFinder.find_spec(top, dirs)
    if spec is None or spec.loader is None:
        return importlib.import_module(module_name)
    sys.modules[top] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(sys.modules[top])
        module = importlib.import_module(module_name)
    except BaseException:
        _forget(top)
        raise
    others = [p for p in sys.path if p not in dirs]
    if importlib.machinery.PathFinder.find_spec(top, others) is not None:
        _forget(top)
    return module


def _forget(top: str) -> None:
    """Drop module `top` and its submodules from sys.modules."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def import_callable(name: str, python_path: list[str]) -> Callable[..., Any]:
    """`package.module:factory` -> the factory, imported as Python imports it, except that
    `model.python_path` is searched first for its top-level name only."""
    dirs = add_python_path(python_path)
    module_name, _, attr = name.partition(":")
    try:
        module = _import_user_module(module_name, dirs)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{name}: no module named {e.name!r} on the Python path; put the directory that "
                              "holds it in model.python_path (or PYTHONPATH), or install its package") from None
        raise ConfigError(f"{name}: importing {module_name} failed: {_error_at(e)}") from None
    except Exception as e:
        raise ConfigError(f"{name}: importing {module_name} failed: {_error_at(e)}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{name}: module {module_name} ({getattr(module, '__file__', '?')}) has no attribute "
                          f"{attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ConfigError(f"{name}: {attr} is a {type(factory).__name__}, not a callable")
    return factory


def _error_at(e: BaseException) -> str:
    """`TypeError: message (at file.py:12)`: the exception and the innermost line it came
    from, the one a user needs to fix, without a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" (at {e.filename}:{e.lineno})"
    return f"{type(e).__name__}: {e}{where}"


def _build_user(name: str, num_classes: int, kwargs: dict[str, Any], python_path: list[str]) -> nn.Module:
    factory = import_callable(name, python_path)
    call = f"{name}(num_classes={num_classes}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except Exception as e:
        raise ConfigError(f"{call} failed: {_error_at(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{call} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# -- checking ---------------------------------------------------------------------------


def check_output(model: nn.Module, what: str, num_classes: int, image_size: int, channels_last: bool = False) -> None:
    """The model maps a [2, 3, S, S] batch to [2, num_classes] logits, in training mode (how
    it learns) and evaluation mode (how it is evaluated and teaches), in the memory format
    training feeds it (train.channels_last). Leaves its parameters, buffers (BatchNorm
    statistics), mode and the random streams as they were."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for mode in ("training", "evaluation"):
                model.train(mode == "training")
                _check_one(model, what, x, num_classes, mode)
    finally:
        model.load_state_dict(saved)
        model.train(was_training)


def _check_one(model: nn.Module, what: str, x: torch.Tensor, num_classes: int, mode: str) -> None:
    shape = list(x.shape)
    try:
        out = model(x)
    except Exception as e:
        hint = ""
        if not x.is_contiguous() and _runs(model, x.contiguous()):
            hint = (" (it runs on a contiguous batch: train.channels_last=true gives it channels_last tensors, "
                    "on which .view() fails; use .reshape() or .flatten(), or set train.channels_last=false)")
        raise ConfigError(f"{what}: a forward pass on a {shape} batch in {mode} mode failed: {_error_at(e)}{hint}"
                          ) from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{what}: in {mode} mode the model returns a {type(out).__name__}, not a tensor of "
                          "logits (torchvision's googlenet and inception_v3 need '{\"aux_logits\": false}' in "
                          "model.<role>_kwargs)")
    if list(out.shape) != [len(x), num_classes]:
        raise ConfigError(f"{what}: on a {shape} batch in {mode} mode the model gives shape {list(out.shape)}, "
                          f"expected [{len(x)}, {num_classes}] (batch, num_classes)")


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        model(x)
    except Exception:
        return False
    return True


def check_models(cfg: Config, roles: list[str], num_classes: int) -> None:
    """Build and check each role's model now, before any data is prepared: a bad name, a module
    that does not import, a callable that does not return a module, a wrong output shape. The
    class count may be provisional (the data's is known once it is prepared, and the real
    build checks it again); the random streams are left as they were."""
    with torch.random.fork_rng(devices=[]):
        for role in roles:
            build_model(cfg, role, num_classes)


def model_facts(model: nn.Module, image_size: int) -> dict[str, int]:
    """Parameters and multiply-adds per image (torch.utils.flop_counter on one image in
    evaluation mode: its FLOPs of convolutions and matrix products, halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "macs_per_image": counter.get_total_flops() // 2}



def make_model(cfg: Config, role: str, num_classes: int, device: torch.device) -> nn.Module:
    """The model of `role` on `device`, in the training memory format, with the same initial
    weights on every rank (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, role, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def use_sync_bn(cfg: Config, device: torch.device, world_size: int) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm (train.sync_bn, with more than one rank);
    refused on CPUs, where torch's SyncBatchNorm does not run."""
    if not cfg.train.sync_bn or world_size == 1:
        return False
    if device.type != "cuda":
        raise ConfigError(f"train.sync_bn=true needs CUDA devices: torch's SyncBatchNorm does not run on "
                          f"{device.type} ({world_size} ranks here); drop it, or train on GPUs")
    return True
