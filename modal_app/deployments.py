"""The Modal apps of ``deployments.toml``: list them, and check them offline.

    python -m modal_app.deployments            one name per line (for a deploy loop)
    python -m modal_app.deployments --check    every table loads, app names and job dicts are distinct,
                                               and every model it names is in models.toml

Exit status 2 with the problems when a check fails.
"""

from __future__ import annotations

import sys

from gpubridge.errors import ConfigError

from .config import DEPLOYMENTS_FILE, AppConfig, load_config, load_deployments

__all__ = ["check", "main"]


def check(tables: dict | None = None) -> dict[str, AppConfig]:
    """Every deployment's config; ConfigError naming each problem."""
    from .runtime import load_manifest

    tables = load_deployments() if tables is None else tables
    known = {entry.name for entry in load_manifest()}
    configs: dict[str, AppConfig] = {}
    problems: list[str] = []
    for name in tables:
        try:
            cfg = load_config(deployment=name, deployments=tables)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        missing = [m for m in cfg.models or [] if m not in known]
        if missing:
            problems.append(f"[deployments.{name}]: model(s) {', '.join(missing)} not in models.toml")
        for other, seen in configs.items():
            if seen.name == cfg.name:
                problems.append(f"[deployments.{name}] and [deployments.{other}] are both app {cfg.name!r}")
            if seen.jobs_dict == cfg.jobs_dict:
                problems.append(f"[deployments.{name}] and [deployments.{other}] share jobs_dict {cfg.jobs_dict!r}")
        configs[name] = cfg
    if problems:
        raise ConfigError(f"{DEPLOYMENTS_FILE.name}: " + "; ".join(problems))
    return configs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        configs = check() if "--check" in args else {name: None for name in load_deployments()}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, cfg in configs.items():
        print(name if cfg is None else f"{name}: app {cfg.name}, gpus {','.join(cfg.gpus)}, "
              f"{len(cfg.models) if cfg.models is not None else 'all'} models")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
