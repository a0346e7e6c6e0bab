"""The public API as the README shows it: its Python snippets' imports work, and so does
``from fastvader import *``, which exports every name ``__all__`` lists."""
import re
from pathlib import Path

import fastvader

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_snippets_imports_work():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    imports = [line.strip() for block in blocks for line in block.splitlines()
               if line.startswith(("from fastvader", "import fastvader"))]
    assert "from fastvader import load_config, train" in imports
    for line in imports:
        exec(line, {})


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from fastvader import *", namespace)
    assert {"TrainConfig", "load_config", "train", "load_lora", "apply", "revert", "UserError"} <= namespace.keys()
    assert all(hasattr(fastvader, name) for name in fastvader.__all__)


def test_the_readme_config_table_lists_every_section_and_field():
    import dataclasses

    from fastvader.config import TrainConfig

    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", README.read_text(), flags=re.M))
    for section in dataclasses.fields(TrainConfig):
        assert section.name in rows, f"README's config table has no row for {section.name}"
        for field in dataclasses.fields(section.default_factory()):
            assert f"`{field.name}`" in rows[section.name], f"README's config table misses {section.name}.{field.name}"
