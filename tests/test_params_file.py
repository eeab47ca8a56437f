"""params.yaml is generated from the settings classes (`sslvision params`): the repository's file is the
generator's output, every key has its help in its pydantic field, `sslvision init`'s projects come from the
same generator; and the pipeline's stages are listed once (sslvision.stages.STAGES)."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sslvision.cli import app
from sslvision.params import (
    COMMENT_COLUMN,
    SECTIONS,
    WIDTH,
    ParamsError,
    Section,
    render_params,
    section_class,
    section_defaults,
)
from sslvision.project import DEMO_OVERRIDES, DVC_TEMPLATE, PROJECT_SECTIONS, demo_params_text, params_text
from sslvision.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _fields(cls: type[Section], prefix: str = ""):
    """(dotted params.yaml key, field) of every key of ``cls``, nested sections' keys included."""
    for name, field in cls.model_fields.items():
        key = prefix + (field.alias or name)
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from _fields(field.annotation, key + ".")


def _blocks(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> top-level key -> its lines (the key line, its comment and nested lines, notes above excluded)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = key = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section, key = line.split(":", 1)[0], None
            out[section] = {}
        elif section and line.startswith("  ") and not line.startswith("   ") and not line.startswith("  #"):
            key = line.split(":", 1)[0].strip()
            out[section][key] = [line]
        elif section and key and line.startswith("   "):
            out[section][key].append(line)
    return out


def _comments(text: str) -> str:
    """Every comment of ``text`` as one line (wrapped comments joined)."""
    return " ".join(line.split("# ", 1)[1] for line in text.splitlines() if "# " in line)


def test_the_repository_params_yaml_is_the_generated_file():
    assert (ROOT / "params.yaml").read_text() == demo_params_text(), \
        "params.yaml differs from the generator's output: run `sslvision params --out params.yaml`"


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_key_has_a_description_and_every_section_a_docstring(name):
    cls = section_class(name)
    assert (cls.__doc__ or "").strip(), f"{cls.__name__}: no docstring (the section's heading in params.yaml)"
    missing = [key for key, field in _fields(cls) if not (field.description or "").strip()]
    assert not missing, f"{cls.__name__}: keys without Field(description=...): {missing}"


def test_each_key_is_commented_with_its_description_within_the_width():
    text = render_params()
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    comments = _comments(text)
    for name in SECTIONS:
        for key, field in _fields(section_class(name)):
            assert " ".join(field.description.split()) in comments, f"{name}.{key}"
    assert all(line.index("# ") == COMMENT_COLUMN for line in lines if line.startswith(" " * COMMENT_COLUMN + "#"))


def test_the_generated_values_are_the_defaults_and_the_documented_demo_overrides():
    text = demo_params_text()
    params, comments = yaml.safe_load(text), _comments(text)
    assert list(params) == list(SECTIONS)
    for name in SECTIONS:
        expected = section_defaults(name)
        for key, (value, why) in DEMO_OVERRIDES.get(name, {}).items():
            assert expected[key] != value, f"{name}.{key}: the demo override equals the default"
            assert f"demo: {why}" in comments, f"{name}.{key}: the reason is written"
            expected[key] = value
        assert params[name] == expected, name
        section_class(name).model_validate(params[name])


def test_a_bad_value_or_key_is_refused_by_the_generator():
    with pytest.raises(ParamsError, match=r"ingest\.size"):
        render_params(["ingest"], values={"ingest": {"size": -1}})
    with pytest.raises(ParamsError, match="sise"):
        render_params(["ingest"], values={"ingest": {"sise": 3}})


def test_the_init_projects_params_come_from_the_same_generator(tmp_path):
    from sslvision.project import inspect_data
    from tests.test_init import photo_folder

    text = params_text(inspect_data(photo_folder(tmp_path / "photos", per_class=3)), source="data/split.csv",
                       version="0.1.0")
    init, defaults = _blocks(text), _blocks(render_params(PROJECT_SECTIONS))
    params = yaml.safe_load(text)
    assert list(init) == ["sslvision", *PROJECT_SECTIONS]
    for name in PROJECT_SECTIONS:
        assert list(init[name]) == list(defaults[name]), name
        default_values = section_defaults(name)
        same = [key for key in defaults[name] if params[name][key] == default_values[key]]
        assert same and all(init[name][k] == defaults[name][k] for k in same), name


def test_the_cli_writes_and_checks_the_file(tmp_path):
    out = tmp_path / "params.yaml"
    runner = CliRunner()
    assert runner.invoke(app, ["params", "--check", "--out", str(out)]).exit_code == 1
    assert runner.invoke(app, ["params", "--out", str(out)]).exit_code == 0
    assert out.read_text() == demo_params_text()
    assert runner.invoke(app, ["params", "--check", "--out", str(out)]).exit_code == 0


# --- one list of stages ----------------------------------------------------------------------------


def test_the_stage_list_is_dvc_yamls_for_the_demo_and_for_init_projects():
    from sslvision import summary, trigger

    assert list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == list(STAGES)
    assert list(yaml.safe_load(DVC_TEMPLATE.replace("{ROOT_DEP}", ""))["stages"]) == list(STAGES)
    assert list(STAGES) == trigger.STAGE_ORDER and summary.STAGES is STAGES


def test_the_init_template_runs_the_same_pipeline_as_the_repository():
    """`sslvision init`'s dvc.yaml and this repository's differ only in how the code is named: a module of the
    installed package (params key sslvision.version) instead of the source files (code deps), and drift_eval's
    batch and the plots of a batch, which a new project does not have (DVC fails on a listed plot the stage did
    not write). Outputs, metrics, the other plots, params and data deps are the same."""
    def normalised(text: str, project: bool) -> dict:
        stages = yaml.safe_load(text)["stages"]
        out = {}
        for name, st in stages.items():
            deps = [d for d in st.get("deps", []) if not d.startswith(("src/", "stages/"))]
            out[name] = {
                "deps": sorted(d for d in deps if d != "${drift_eval.batch}"),
                "params": sorted(p for p in st.get("params", []) if p != "sslvision.version"),
                **{k: st.get(k) for k in ("outs", "metrics", "plots")},
            }
            if project:
                assert st["cmd"] == f"python -m sslvision.stages.{name}" and "sslvision.version" in st["params"]
        return out

    repo = normalised((ROOT / "dvc.yaml").read_text(), project=False)
    template = normalised(DVC_TEMPLATE.replace("{ROOT_DEP}", ""), project=True)
    repo["drift_eval"]["plots"] = None
    for name in repo:
        assert template[name] == repo[name], name
