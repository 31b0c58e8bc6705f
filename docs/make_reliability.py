"""Run the full test suite and put its fault tally into docs/reliability.md.

    python docs/make_reliability.py

The table between the figures markers is replaced only after a full passing run.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "reliability.md")
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        env = {**os.environ, "OTFML_FIGURES": out}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              os.path.join(os.path.dirname(HERE), "tests")], env=env)
        if rc != 0 or not os.path.exists(out):
            print("the test run did not pass; docs/reliability.md is unchanged", file=sys.stderr)
            return 1
        with open(out) as fh:
            figures = json.load(fh)
    rows = ["| fault or input | count |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in sorted(figures.items())]
    with open(DOC) as fh:
        text = fh.read()
    head, rest = text.split(BEGIN, 1)
    with open(DOC, "w") as fh:
        fh.write(f"{head}{BEGIN}\n" + "\n".join(rows) + f"\n{END}{rest.split(END, 1)[1]}")
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
