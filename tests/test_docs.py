"""The documentation site (docs/) builds without a single warning, and the README stays in step with it and CI.

The build needs the ``docs`` extra (``pip install -e ".[docs]"``: Sphinx, MyST-Parser, Furo); without it that test
is skipped, saying so. ``.ci/run`` installs the extra and runs this file, so CI always builds the site.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")

DOCS_TOOLS = ("sphinx", "myst_parser", "furo")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


@pytest.mark.timeout(600)
def test_docs_build_with_warnings_as_errors(tmp_path):
    missing = [m for m in DOCS_TOOLS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs tooling is not installed ({', '.join(missing)} missing): "
                    f"pip install -e \".[docs]\" (.ci/run installs it and runs this test)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the command docs/about.md gives, into a temporary folder (and its doctrees there too)
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), DOCS, str(tmp_path / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=570)
    assert proc.returncode == 0, f"the docs build failed or warned:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    html = tmp_path / "html"
    for page in ("index", "installation", "examples", "peft", "trainer", "twa", "trl", "distributed", "quantized",
                 "intrinsic_dimension", "reliability", "how_it_works", "benchmarks", "layout", "references",
                 "api/index", "api/core"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api" / "core.html").read_text(encoding="utf-8")
    for name in ("SubspaceConfig", "SubspaceTrainer", "SubspaceTrainingArguments", "reparameterize",
                 "check_projections_match", "SubspaceConfigError"):
        assert f'id="hf_subspace.{name}"' in api or f'id="hf_subspace.errors.{name}"' in api, name


def test_readme_test_command_is_what_ci_runs():
    """The README's test command (the Quickstart's second one) is the line .ci/run executes, up to pip install's -q."""
    blocks = re.findall(r"```bash\n(.*?)\n```", _readme(), re.DOTALL)
    test_cmd = next(b for b in blocks if "pytest" in b)
    prefix = "python3 -m venv .venv && . .venv/bin/activate && "
    assert test_cmd.startswith(prefix), test_cmd
    with open(CI_RUN, encoding="utf-8") as f:
        ci_lines = [ln.replace("pip install -q ", "pip install ") for ln in f.read().splitlines()]
    assert test_cmd[len(prefix):] in ci_lines


def test_readme_links_into_the_docs_exist():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", _readme())
    assert links, "the README links into docs/"
    for link in links:
        assert os.path.isfile(os.path.join(ROOT, link)), link
