"""Merge a profile's overrides into params.yaml (keys not in the profile keep their values).

    python tools/profile.py profiles/gpu.yaml && dvc exp run -n gpu-run
    git checkout params.yaml          # back to the defaults
"""

import sys

import yaml


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def main() -> None:
    profile, target = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "params.yaml")
    p = merge(yaml.safe_load(open(target)), yaml.safe_load(open(profile)))
    sys.path.insert(0, ".")
    from codex_ml.params import Params

    Params.model_validate(p)  # a profile that doesn't validate never reaches params.yaml
    with open(target, "w") as f:
        yaml.safe_dump(p, f, sort_keys=False, width=100)
    print(f"{target}: applied {profile}")


if __name__ == "__main__":
    main()
