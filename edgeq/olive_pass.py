"""``edgeq export`` as an Olive pass: a Hugging Face model in, edgeq's artifact folder out.

The pass ``EdgeqExport`` takes Olive's ``HfModelHandler`` (a local folder or a hub id, as
``--model``) and returns an ``ONNXModelHandler`` on the artifact's ``model.onnx``; the whole artifact
folder (report, manifest, tokenizer, reference) is the pass's output folder. Its options are the
``edgeq export`` options themselves, read from the CLI's parser (``edgeq.cli.add_export_options``):
``group_size`` is ``--group-size``, ``symmetric`` is ``--symmetric``; an option that is not given
keeps the CLI's default, and every value goes through the CLI's own parsing into the ExportConfig
(``edgeq.cli.export_config_from_argv``), so the pass and the CLI cannot drift and reject the same
input with the same message. Left out: ``--model`` (the input model), ``--out`` and ``--overwrite``
(Olive's folder for the pass's output, keyed by its config). ``resume`` continues an interrupted
run of the same workflow from its last finished block, as ``--resume`` does: Olive gives the rerun
the same folder.

A pass outside Olive is found through a package config that names its module: ``run_workflow``
runs a workflow with Olive's own passes and this one; ``olive run --package-config`` takes
``examples/olive_package_config.json`` (this pass only). Needs ``pip install "edgeq[olive]"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

try:
    from olive.model import HfModelHandler, ONNXModelHandler
    from olive.passes.olive_pass import Pass
    from olive.passes.pass_config import PassConfigParam, PassParamDefault
    from olive.search.search_parameter import SearchParameter, SpecialParamValue
except ImportError as err:  # olive is an optional extra; the rest of edgeq never imports this module
    raise ImportError(f"edgeq's Olive pass needs olive-ai: pip install 'edgeq[olive]' ({err})") from err

from edgeq.cli import export_config_from_argv, export_parser, log_to_stderr
from edgeq.errors import EdgeqError

PASS_NAME = "EdgeqExport"
# What Olive's package config needs to import the pass (``olive.package_config.PassModuleConfig``).
PASS_MODULE_CONFIG = {
    "module_path": f"{__name__}.{PASS_NAME}",
    "supported_providers": ["*"],
    "supported_accelerators": ["*"],
    "supported_precisions": ["*"],
}
# ``edgeq export`` options the workflow itself supplies, with what stands for them.
NOT_PASS_OPTIONS = {
    "--model": "the input model handler's path",
    "--out": "the pass's output folder",
    "--overwrite": "the pass's output folder",
}


# Olive's engine re-raises AssertionError, ValueError and a few others from a pass and only logs any
# other exception, ending the workflow without an output model and without an error
# (``olive.exception.EXCEPTIONS_TO_RAISE``): the pass's errors are of those kinds so that a
# pipeline stops on them, as the CLI's exit status does.


class RejectedInput(EdgeqError, ValueError):
    """What the CLI prints as ``edgeq: error: ...`` (exit status 2), with the same message."""


class GatesFailed(AssertionError):
    """The artifact was written but failed a validation gate (the CLI's exit status 1)."""


def export_options() -> dict[str, argparse.Action]:
    """Pass option name → the ``edgeq export`` option it stands for (``--group-size`` → group_size)."""
    options = {}
    for action in export_parser()._actions:  # argparse's only list of a parser's options
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag is not None and flag not in NOT_PASS_OPTIONS:
            options[flag.removeprefix("--").replace("-", "_")] = action
    return options


def _option_type(action: argparse.Action) -> Any:
    """The Python type of an option's value: bool for a flag, int/float where argparse converts to
    one; a value argparse converts itself (``--eval-windows 40|all``, ``--act-clip 0.9|search``) is
    taken as written and converted by the CLI's parser."""
    if action.nargs == 0:
        return bool
    if action.type in (int, float):
        return action.type
    return str if action.type in (None, Path) else int | float | str


def _description(flag: str, action: argparse.Action) -> str:
    """The CLI's help for the option (argparse's ``%(default)s`` filled in)."""
    text = (action.help or "") % {**vars(action), "prog": "edgeq export"}
    return f"edgeq export {flag}: {text}"


def argv_for(values: dict[str, Any], model: str | None = None) -> list[str]:
    """The ``edgeq export`` arguments that pass option values stand for (group_size →
    ``--group-size``): a True flag is given, a None or False one is not, any other value is
    ``--option=value``. A name that is no option becomes an argument the CLI's parser rejects."""
    argv = [f"--model={model}"] if model is not None else []
    for name, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv.append(flag if value is True else f"{flag}={value}")
    return argv


def _is_placeholder(value: Any) -> bool:
    """A value Olive resolves later (a search space, DEFAULT_VALUE), not one the user fixed."""
    if isinstance(value, (SearchParameter, SpecialParamValue)):
        return True
    if isinstance(value, dict) and value.get("olive_parameter_type") == "SearchParameter":
        return True
    return isinstance(value, str) and value in set(PassParamDefault)


def check_options(values: dict[str, Any]) -> None:
    """Reject what ``edgeq export`` rejects with these options before it loads a model (names that
    are not its options included), raising RejectedInput with the CLI's message."""
    from edgeq.export import validate_inputs

    for name in values:
        flag = "--" + name.replace("_", "-")
        if flag in NOT_PASS_OPTIONS:
            raise RejectedInput(
                f"'{name}' is not an option of {PASS_NAME}: {NOT_PASS_OPTIONS[flag]} stands for {flag}"
            )
    fixed = {name: value for name, value in values.items() if not _is_placeholder(value)}
    try:
        validate_inputs(export_config_from_argv(argv_for(fixed)))
    except EdgeqError as err:
        raise RejectedInput(str(err)) from None


class EdgeqExport(Pass):
    """Quantize a Hugging Face causal LM with edgeq and export it to 4-bit ONNX (``edgeq export``)."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        return {
            name: PassConfigParam(
                type_=_option_type(action),
                default_value=False if action.nargs == 0 else None,
                description=_description(action.option_strings[-1], action),
            )
            for name, action in export_options().items()
        }

    @classmethod
    def generate_config(cls, accelerator_spec, config=None, point=None, disable_search=False):
        """Olive's config object for the options (``Pass.generate_config``), after the CLI's checks
        on the user's own values: Olive itself would drop an unknown name with a warning."""
        check_options({**dict(config or {}), **(point or {})})
        return super().generate_config(accelerator_spec, config, point, disable_search)

    def _run_for_config(self, model, config, output_model_path: str) -> ONNXModelHandler:
        """Run the export into ``output_model_path`` (Olive's fresh folder for this run) and return
        the handler of its ``model.onnx``; a failed gate raises GatesFailed, the artifact kept."""
        from edgeq.export import run_export

        if not isinstance(model, HfModelHandler):
            raise RejectedInput(
                f"{PASS_NAME} takes a Hugging Face model (HfModel), got {type(model).__name__}"
            )
        if model.adapter_path:
            raise RejectedInput(f"{PASS_NAME} exports a whole checkpoint: merge the adapter into it first")
        values = {name: getattr(config, name) for name in export_options()}
        out = Path(output_model_path)
        out = out.with_suffix("") if out.suffix == ".onnx" else out
        log_to_stderr()  # edgeq's progress lines, as the CLI prints them
        try:
            export_config = export_config_from_argv(argv_for(values, str(model.model_name_or_path)))
            report = run_export(export_config, out, overwrite=True, progress=False, resume=config.resume)
        except EdgeqError as err:
            raise RejectedInput(str(err)) from None
        validation = report.get("validation", {"passed": True})
        if not validation["passed"]:
            failed = ", ".join(
                f"{g['name']} ({g['provider']})" for g in validation["gates"] if not g["passed"]
            )
            raise GatesFailed(f"validation gates failed: {failed or 'generation'}; see {out / 'report.md'}")
        return ONNXModelHandler(model_path=str(out), onnx_file_name="model.onnx")


def package_config() -> dict[str, Any]:
    """Olive's package config (its own passes) with this pass added, for ``olive.workflows.run``."""
    from olive.package_config import OlivePackageConfig

    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config["passes"][PASS_NAME] = PASS_MODULE_CONFIG
    return config


def run_workflow(config: str | Path | dict[str, Any], **kwargs: Any) -> Any:
    """``olive.workflows.run`` on a workflow (file or dict) that may use this pass next to Olive's."""
    from olive.workflows import run

    return run(config, package_config=package_config(), **kwargs)
