"""Write docs/configuration.md from otfml.settings.SCHEMA: python docs/make_configuration.py"""

import os

from otfml.settings import keys_markdown

HEAD = """# Configuration

Every key of a workflow file (`otfml run FILE.yaml`), its type, default and meaning.
The same table is printed by `otfml check --keys`; the Python constructors
(`Descriptor`, `SparseGP`, `LearningPolicy`, the `model` dict of `OTFCalculator`) take
the same defaults. Relative paths in a file are taken relative to that file.

A workflow file has the sections `system`, `reference`, `model`, `learning`, `store`,
`driver` and `output`, and optionally `stages`. Unknown keys are errors that name the
closest valid one. Any key can be set on the command line: `--set driver.steps=5000`.

"""

if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")
    with open(path, "w") as fh:
        fh.write(HEAD + keys_markdown() + "\n")
    print(path)
