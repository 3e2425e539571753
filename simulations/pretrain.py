"""``python -m simulations.pretrain``: pretrain a project backbone on its source domain and cache it.

    python -m simulations.pretrain                 # mnist1d-transformer (a few minutes on 1 core)
    python -m simulations.pretrain --quick         # mnist1d-transformer-quick (seconds; tests)
    python -m simulations.pretrain --out my.safetensors   # write elsewhere (use model_args.weights)

The weights land in ``<data cache>/backbones/<name>-<recipe hash>.safetensors`` (``$FEDAGG_CACHE``
or ``~/.cache/fedagg``), written atomically with the recipe and the source-domain accuracy as
metadata; model kinds ``fedins``, ``ssf``, ``head-only`` and ``finetune`` load them from there (and
pretrain on the fly when the entry is missing). A cached backbone is reported, not retrained,
unless ``--force``. Invalid input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedagg.errors import ConfigError
from simulations.cli import Parser


def build_parser() -> argparse.ArgumentParser:
    from fedagg.models.backbone import backbone_names

    p = Parser(prog="python -m simulations.pretrain",
               description="Pretrain a project backbone on its source domain (canonical MNIST-1D, "
                           "its own data seed) and cache it.")
    p.add_argument("--backbone", default="mnist1d-transformer",
                   help=f"backbone with a pretraining recipe ({', '.join(backbone_names())})")
    p.add_argument("--quick", action="store_true",
                   help="the tiny test backbone (mnist1d-transformer-quick)")
    p.add_argument("--out", help="write the weights to this .safetensors file instead of the cache")
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fedagg.models.backbone import (
        backbone_cache_path,
        backbone_entry,
        pretrain,
        read_metadata,
        save_backbone,
    )

    args = build_parser().parse_args(argv)
    name = "mnist1d-transformer-quick" if args.quick else args.backbone
    try:
        entry = backbone_entry(name, field="--backbone")
        if entry.recipe is None:
            raise ConfigError("--backbone", f"{name!r} has no pretraining recipe (it brings its "
                              "own weights)")
        path = Path(args.out) if args.out else backbone_cache_path(name, entry.recipe)
        if args.out and path.suffix != ".safetensors":
            raise ConfigError("--out", f"must end in .safetensors, got {path}")
        if path.is_file() and not args.force:
            meta = read_metadata(path)
            acc = meta.get("source_test_accuracy")
            print(f"{name}: cached at {path}"
                  + (f" (source-domain test accuracy {100 * float(acc):.2f} %)" if acc else ""))
            return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pretraining {name} on canonical MNIST-1D (data_seed {entry.recipe.data_seed}, "
          f"{entry.recipe.steps} steps) ...", flush=True)
    model, report = pretrain(entry.recipe)
    save_backbone(path, model, entry.recipe, report)
    print(f"{name}: source-domain accuracy {100 * report.source_test_accuracy:.2f} % test, "
          f"{100 * report.source_train_accuracy:.2f} % train; {report.parameters:,} parameters; "
          f"{report.seconds:.1f} s → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
