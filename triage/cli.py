"""The ``triage`` command. Subcommands import their modules lazily so that start-up is fast.

Each subcommand maps to ``module:function``; the function takes ``(args, settings)`` and
returns an exit code. Modules own their own logic; this file only declares the interface.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from triage import __version__
from triage.config import ConfigError, Settings, load_settings

# Literal here, not imported: the model modules pull in torch, and the CLI starts without it.
DATASET_FORMATS = ["auto", "phantom", "rsna", "cq500", "ctich", "slices"]  # triage.models.data
TTA_CHOICES = ["none", "flip"]  # triage.models.inference.TTA_MODES

Handler = Callable[[argparse.Namespace, Settings], int]


def _handler(target: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        module, func = target.split(":")
        return int(getattr(importlib.import_module(module), func)(args, settings) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triage", description="Acute intracranial hemorrhage triage node")
    p.add_argument("--config", help="TOML configuration file (or TRIAGE_CONFIG)")
    p.add_argument("--version", action="version", version=f"triage {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, target: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=_handler(target))
        return sp

    # --- roles
    add("serve", "triage.roles:serve", "All-in-one: receiver, worker, scheduler and web (embedded default)")
    add("receiver", "triage.roles:receiver", "DICOM SCP and series assembly only")
    w = add("worker", "triage.roles:worker", "Inference and delivery worker only")
    w.add_argument("--once", action="store_true", help="Drain the queue and exit")
    w.add_argument("--kinds", default="", help="Comma-separated job kinds to take (default: all)")
    add("web", "triage.roles:web", "Web pages, REST API and metrics only")

    # --- database
    db = sub.add_parser("db", help="Database migrations").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="Apply migrations (idempotent)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_handler("triage.admin:cli_upgrade"))
    down = db.add_parser("downgrade", help="Revert migrations")
    down.add_argument("revision", nargs="?", default="-1")
    down.set_defaults(func=_handler("triage.admin:cli_downgrade"))
    db.add_parser("current", help="Show the current revision").set_defaults(
        func=_handler("triage.admin:cli_current")
    )

    # --- configuration
    cfg = sub.add_parser("config", help="Configuration").add_subparsers(dest="config_command", required=True)
    cfg.add_parser("show", help="Print the effective configuration (secrets masked)").set_defaults(
        func=_handler("triage.cli:config_show")
    )

    # --- audit
    au = sub.add_parser("audit", help="Audit trail").add_subparsers(dest="audit_command", required=True)
    au.add_parser("verify", help="Verify the hash chain").set_defaults(func=_handler("triage.admin:cli_verify"))

    # --- users
    us = sub.add_parser("user", help="Local users").add_subparsers(dest="user_command", required=True)
    ua = us.add_parser("add", help="Create a user")
    ua.add_argument("username")
    ua.add_argument("--role", choices=["admin", "radiologist"], default="radiologist")
    ua.add_argument("--password", help="Password (default: prompt, or TRIAGE_NEW_PASSWORD)")
    ua.set_defaults(func=_handler("reports.web.users:cli_add"))
    ut = us.add_parser("token", help="Create an API token for a user")
    ut.add_argument("username")
    ut.set_defaults(func=_handler("reports.web.users:cli_token"))
    us.add_parser("list", help="List users (role, state, token, sessions, throttled)").set_defaults(
        func=_handler("reports.web.users:cli_list"))
    for name, target, help_ in (("disable", "cli_disable", "Disable a user (ends its sessions)"),
                                ("enable", "cli_enable", "Enable a disabled user"),
                                ("unlock", "cli_unlock", "Clear a user's failed-login waits")):
        sp = us.add_parser(name, help=help_)
        sp.add_argument("username")
        sp.set_defaults(func=_handler(f"reports.web.users:{target}"))
    ur = us.add_parser("role", help="Change a user's role (ends its sessions)")
    ur.add_argument("username")
    ur.add_argument("role", choices=["admin", "radiologist"])
    ur.set_defaults(func=_handler("reports.web.users:cli_role"))
    up_ = us.add_parser("password", help="Reset a user's password (ends its sessions)")
    up_.add_argument("username")
    up_.add_argument("--password", help="New password (default: prompt, or TRIAGE_NEW_PASSWORD)")
    up_.set_defaults(func=_handler("reports.web.users:cli_password"))
    uv = us.add_parser("revoke", help="Revoke a user's API token and end its web sessions")
    uv.add_argument("username")
    uv.add_argument("--tokens", action="store_true", help="Only the API token")
    uv.add_argument("--sessions", action="store_true", help="Only the web sessions")
    uv.set_defaults(func=_handler("reports.web.users:cli_revoke"))

    # --- queue / operations
    q = sub.add_parser("queue", help="Job queue").add_subparsers(dest="queue_command", required=True)
    q.add_parser("status", help="Jobs by kind and state").set_defaults(func=_handler("triage.admin:cli_queue_status"))
    qr = q.add_parser("retry", help="Re-queue a dead job")
    qr.add_argument("job_id", type=int)
    qr.set_defaults(func=_handler("triage.admin:cli_queue_retry"))
    add("purge", "triage.admin:cli_purge", "Apply the retention policy now")

    # --- synthetic data, models
    ph = add("phantom", "triage.phantom.cli:main", "Generate synthetic head CT studies with ground truth")
    ph.add_argument("out")
    ph.add_argument("--studies", type=int, default=10)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--extra", action="append", default=[], help="Generator option key=value")
    ph.add_argument("--montage", action="store_true", help="Also write a montage PNG per study")
    ph.add_argument("--workers", type=int, default=0, help="Processes (default: CPU count)")
    de = add("demo", "triage.phantom.demo:main", "Generate a few studies and send them to the running node")
    de.add_argument("--studies", type=int, default=3)
    de.add_argument("--seed", type=int, default=2026)
    de.add_argument("--host", default="127.0.0.1")
    de.add_argument("--port", type=int, default=0, help="Node DICOM port (default: config)")
    tr = add("train", "triage.models.train:main", "Train a model bundle")
    tr.add_argument("dataset", help="Dataset path (format detected, or --format)")
    tr.add_argument("--format", default="auto", choices=DATASET_FORMATS)
    tr.add_argument("--out", required=True, help="Output bundle directory")
    tr.add_argument("--epochs", type=int, default=10,
                    help="Slice-network epochs; 0 with --init trains only the sequence head (a second stage "
                         "on studies the slice network never saw)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--val", help="Validation dataset path (for thresholds)")
    tr.add_argument("--cache", default="", help="Preprocessed-study cache directory (default: DATA_DIR/cache)")
    tr.add_argument("--steps-per-epoch", type=int, default=0, help="Batches per epoch (default: one pass)")
    tr.add_argument("--size", type=int, default=96, help="Network input grid size (pixels)")
    tr.add_argument("--stem", type=int, default=1,
                    help="Pixel-unshuffle stem: the U-Net runs at size/stem and sees the full input grid")
    tr.add_argument("--workers", type=int, default=1, help="Processes for preprocessing the studies")
    tr.add_argument("--seq-epochs", type=int, default=15, help="Epochs for the sequence (GRU) head")
    tr.add_argument("--init", default="", help="Start from this bundle's weights (fine-tuning)")
    tr.add_argument("--lr", type=float, default=2e-3,
                    help="Peak learning rate of the one-cycle schedule (lower it to fine-tune a trained bundle)")
    tr.add_argument("--sensitivity", type=float, default=1.0,
                    help="Validation sensitivity the 'any' threshold must keep (subtypes: 0.95)")
    tr.add_argument("--tta", default="none", choices=TTA_CHOICES,
                    help="Test-time augmentation the bundle will run with (validation scores use it too)")
    tr.add_argument("--per-label-rules", action="store_true",
                    help="Choose each label's exam rule on validation (default: one rule, best for 'any')")
    tr.add_argument("--hard-fraction", type=float, default=None,
                    help="Share of each training batch drawn from negative slices with blood mimics "
                         "(calcification, artefact; default 0.2); positives take 0.4")
    tr.add_argument("--input", default="hu", choices=("hu", "brain_window"),
                    help="'brain_window': the real-data recipe (slice sets, phantoms, pasted bleed shapes; "
                         "triage/models/train_mixed.py); 'hu': the synthetic multi-window recipe")
    tr.add_argument("--shapes", default="", help="brain_window: folder of real 3-D bleed masks to paste (shapes.csv)")
    tr.add_argument("--paste-hu", default="",
                    help="brain_window: density range of pasted blood, LO,HI in HU (default 55,85)")
    tr.add_argument("--aug-window-width", default="",
                    help="brain_window: range of the window augmentation's width, LO,HI in HU (default 60,130); "
                         "a lower end under 60 lets slices published in a wide window reach the node's 40/80 contrast")
    tr.add_argument("--paste-crescents", type=float, default=0.0,
                    help="brain_window: share of pastes that are thin extra-axial crescents along the inner "
                         "table (subdural) instead of bleed shapes")
    tr.add_argument("--paste-csf", type=float, default=0.0,
                    help="brain_window: share of pastes that are blood in the slice's own CSF spaces (sulci and "
                         "cisterns: subarachnoid; ventricles: intraventricular) instead of bleed shapes")
    tr.add_argument("--paste-sinus", type=float, default=0.0,
                    help="brain_window: share of real blood-free slices given a conspicuous dural venous sinus "
                         "(12-24 HU over the slice's brain, a normal mimic of blood), still labelled blood-free")
    tr.add_argument("--transplant", type=float, default=0.0,
                    help="brain_window: share of pastes that are the drawn blood of a --transplant-from slice moved "
                         "into a blood-free real slice (the donor slices are never shown whole)")
    tr.add_argument("--transplant-from", default="",
                    help="brain_window: slice sets with drawn blood masks that give --transplant their blood")
    tr.add_argument("--aug-rim", type=float, default=0.0,
                    help="brain_window: share of samples given a smooth density rise toward the inner table "
                         "(beam hardening left uncorrected), labels unchanged")
    tr.add_argument("--aug-scanner", type=float, default=0.0,
                    help="brain_window: share of samples given another reconstruction's look (smooth shading, "
                         "a sharper kernel, grainy noise), labels unchanged")
    tr.add_argument("--batch", type=int, default=0, help="brain_window: slices per batch (default 24)")
    tr.add_argument("--masked-share", type=float, default=0.0,
                    help="brain_window: share of each batch drawn from real slices with drawn blood masks")
    tr.add_argument("--phantom-share", type=float, default=0.3,
                    help="brain_window: share of each batch drawn from phantom studies (half with blood)")
    tr.add_argument("--erase-share", type=float, default=0.0,
                    help="brain_window: share of each batch of real masked slices with their blood erased "
                         "(counterfactual negatives); without masked slices in the training set, the "
                         "--transplant-from donors' slices, which are then shown only erased")
    tr.add_argument("--box-pseudo", action="store_true",
                    help="brain_window: real slices labelled by boxes get a pseudo-mask of the bright blood "
                         "inside each box as pixel targets (the box loss alone only marks one pixel)")
    tr.add_argument("--distill", type=float, default=0.0,
                    help="brain_window with --init: weight of a loss pulling the slice logits to the --init "
                         "bundle's (the segmentation learns, the detector stays)")
    tr.add_argument("--distill-seg", type=float, default=0.0,
                    help="brain_window with --init: weight of a loss pulling the segmentation to the --init "
                         "bundle's (soft targets), on the same slices as --distill")
    tr.add_argument("--distill-on", default="all", choices=("all", "real"),
                    help="brain_window with --distill / --distill-seg: 'real' holds only the plain real slices' "
                         "outputs (phantoms, pasted bleeds and drawn masks are learned freely)")
    tr.add_argument("--freeze-encoder", action="store_true",
                    help="brain_window: train the decoder and heads only")
    tu = add("tune", "triage.models.train:tune",
             "Choose a bundle's exam rule and thresholds again on a validation set (no retraining)")
    tu.add_argument("bundle", help="Bundle directory; its manifest is rewritten")
    tu.add_argument("--val", required=True, help="Validation dataset path")
    tu.add_argument("--format", default="auto", choices=DATASET_FORMATS)
    tu.add_argument("--tta", default="none", choices=TTA_CHOICES,
                    help="Test-time augmentation: 'flip' also reads the series mirrored left-right (2x network time)")
    tu.add_argument("--sensitivity", type=float, default=0.98,
                    help="Validation sensitivity the 'any' threshold must keep (subtypes: 0.95)")
    tu.add_argument("--per-label-rules", action="store_true",
                    help="Choose each label's exam rule on validation (default: one rule, best for 'any')")
    tu.add_argument("--scores-out", default="",
                    help="Also write each validation study's exam scores under every rule (.npz)")
    tu.add_argument("--version", default="", help="New bundle version (its answers change with the thresholds)")
    tu.add_argument("--cache", default="", help="Preprocessed-study cache directory (default: DATA_DIR/cache)")
    tu.add_argument("--workers", type=int, default=1, help="Processes for preprocessing the studies")
    dm = add("domain", "triage.models.domain:cli_fit",
             "Fit a bundle's input-domain check (flags series unlike its training studies)")
    dm.add_argument("bundle", help="Bundle directory; domain.safetensors and the manifest's input_domain are written")
    dm.add_argument("--data", required=True, help="Studies like the training set (the fit)")
    dm.add_argument("--val", required=True, help="Other studies of the same kind (the threshold)")
    dm.add_argument("--format", default="auto", choices=DATASET_FORMATS)
    dm.add_argument("--cache", default="", help="Preprocessed-study cache directory (default: DATA_DIR/cache)")
    dm.add_argument("--workers", type=int, default=1, help="Processes for preprocessing the studies")
    ex = add("export", "triage.models.export:main", "Export a bundle's slice network to ONNX (faster CPU inference)")
    ex.add_argument("bundle", help="Bundle directory; the export and its sha256 are written into it")
    ev = add("evaluate", "triage.models.evaluate:main", "Evaluate a bundle on a dataset")
    ev.add_argument("dataset")
    ev.add_argument("--format", default="auto", choices=DATASET_FORMATS)
    ev.add_argument("--bundle", default="", help="Bundle directory (default: shipped)")
    ev.add_argument("--out", default="evaluation", help="Report directory (JSON + PNG)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--limit", type=int, default=0, help="Evaluate only the first N studies")
    ev.add_argument("--cache", default="", help="Directory caching generated full-resolution studies")
    inf = add("infer", "triage.models.inference:cli_infer", "Run the bundle on a DICOM series folder")
    inf.add_argument("path")
    inf.add_argument("--bundle", default="")
    return p


def config_show(args: argparse.Namespace, settings: Settings) -> int:
    import json

    print(json.dumps(settings.masked(), indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"triage: configuration error: {exc}", file=sys.stderr)
        return 2
    from triage.logging import configure_logging

    configure_logging(settings)
    try:
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"triage: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
