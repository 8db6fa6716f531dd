"""What an install pulls in: the README states it; predict and serve run without
TensorFlow."""

import json
import re
import subprocess
import sys
import textwrap
import tomllib

from test_train import REPO, SUBPROCESS_ENV


def test_predict_and_serve_run_without_tensorflow(smoke_run, tmp_path):
  """A real predict and a real /api/segment request, then sys.modules is inspected."""
  frames = sorted((smoke_run / "raw" / "test").glob("*.tif"))[:2]
  assert frames
  code = textwrap.dedent(f"""
      import json, sys, time
      from fastapi.testclient import TestClient
      from nerveseg_jax import inference, predict, webapp
      rc = predict.main(["--workdir", {str(smoke_run / "workdir")!r}, "--images",
                         {str(frames[0].parent)!r}, "--output", {str(tmp_path / "out")!r},
                         "--batch_size", "2"])
      app = webapp.create_app(lambda: inference.Predictor({str(smoke_run / "workdir")!r},
                                                          batch_size=1))
      with TestClient(app, base_url="http://localhost") as client:
        for _ in range(600):  # the model loads and compiles in the background
          if client.get("/healthz").status_code == 200:
            break
          time.sleep(0.2)
        with open({str(frames[0])!r}, "rb") as f:
          r = client.post("/api/segment", files={{"file": ("a.tif", f, "image/tiff")}})
      print(json.dumps(dict(rc=rc, status=r.status_code,
                            loaded=sorted(m for m in ("tensorflow", "tensorflow_datasets")
                                          if m in sys.modules))))
  """)
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["rc"] == 0 and out["status"] == 200, (out, p.stderr[-2000:])
  assert out["loaded"] == [], f"imported {out['loaded']}"


def test_readme_names_exactly_the_direct_dependencies():
  """The install footprint paragraph lists what pyproject.toml asks for, no more, no less."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  wanted = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("_", "-")
            for d in project["dependencies"]}
  readme = (REPO / "README.md").read_text()
  section = readme[readme.index("### Install footprint"):]
  section = section[:section.index("\n#")]
  listed = " ".join(section[section.index("The direct dependencies"):].split())
  listed = listed[:listed.index(". ")]
  named = {n.lower() for n in re.findall(r"`([A-Za-z0-9_.-]+)`", listed)}
  assert named == wanted, (f"README lacks {sorted(wanted - named)}; "
                           f"README has {sorted(named - wanted)} beyond pyproject.toml")
  # The figures are dated, so a reader knows how old they are.
  assert re.search(r"Measured on \d{4}-\d{2}-\d{2}", section)
