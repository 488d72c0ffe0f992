"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from saepipe.cli import main
from saepipe.harvest import open_store


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (a store, an SAE dir, a run dir), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def committed(store: Path) -> int:
    """Contexts a store's manifest says are committed, read straight from zarr.json (-1: none yet)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["saepipe"]["n_contexts"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def error_lines(err: str) -> list[str]:
    """stderr without progress-bar frames (tqdm redraws with \\r; a terminal shows only the last)."""
    parts = (p.strip() for line in err.split("\n") for p in line.split("\r"))
    return [p for p in parts if p and not (("%|" in p and "/s]" in p) or p.endswith("?tok/s]"))]


def one_line(argv: list[str], capsys) -> str:
    """Run the CLI in process, expecting a refusal: exit 2 and one line on stderr, no traceback."""
    assert main(argv) == 2
    raw = capsys.readouterr().err
    lines = error_lines(raw.replace("saepipe ", "\rsaepipe ", 1))  # a bar's last frame may precede the line
    assert len(lines) == 1 and "Traceback" not in raw, raw
    return lines[0]


def write_relu_sae(
    path: Path, store_path: Path, hook: str, W_enc, b_enc, W_dec, b_dec, record_as_list: bool = True
) -> Path:
    """An SAE dir written by hand straight to the contract (train/sae_dir.py), not through saepipe.train.

    `record_as_list=False` writes the store record as one dict, the form older SAE dirs hold."""
    path.mkdir(parents=True)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(path / "sae_weights.safetensors"),
    )
    store = open_store(str(store_path))
    record = {
        "path": str(store_path),
        "model_fingerprint": store.settings["model"]["fingerprint"],
        "hook": hook,
    }
    cfg = {
        "architecture": "relu", "d_in": W_enc.shape[0], "d_sae": W_enc.shape[1], "hook_name": hook,
        "model_name": store.settings["model"]["name"], "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "saepipe": {"format_version": 1, "store": [record] if record_as_list else record},
    }  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        return "Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[dev])"
    return None


def chromium_driver(profile_dir: Path):
    """A headless Debian chromium under selenium (callers skip first on `chromium_missing()`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"):  # fmt: skip
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def open_page(driver, page: Path):
    """Load a static report page from file:// and wait until its script has rendered (body[data-ready]);
    returns the WebDriverWait for the next waits."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 20)
    driver.get(page.as_uri())
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    return wait


def assert_same_weights(got_run: Path, want_run: Path, names: tuple[str, ...]) -> None:
    """The named SAE dirs of two runs hold exactly the same tensors (bit for bit)."""
    import numpy as np
    from safetensors.numpy import load_file

    for name in names:
        got = load_file(str(got_run / name / "sae_weights.safetensors"))
        want = load_file(str(want_run / name / "sae_weights.safetensors"))
        assert set(got) == set(want), name
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}/{key}")
