"""Write capsnet/testing/cupy_api.json: the API of the installed CuPy, for the emulated
device to check calls against where CuPy is not installed.

    pip install 'capsnet[cuda13]'        # imports without a GPU
    python scripts/cupy_api_list.py
"""
from __future__ import annotations

import json

from capsnet import backend
from capsnet.testing.cupy_api import API_FILE, read_installed_cupy


def main() -> None:
    cupy = backend.installed_cupy()
    if cupy is None:
        raise SystemExit("CuPy is not installed: pip install 'capsnet[cuda13]' (it imports without a GPU)")
    api = read_installed_cupy(cupy)
    API_FILE.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
    print(f"wrote {API_FILE}: CuPy {api['cupy_version']}, {len(api['names'])} names")


if __name__ == "__main__":
    main()
