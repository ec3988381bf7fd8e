"""Stage commands: the ``karma <stage>`` click command generated from a Stage and its settings.

Every option comes from the settings models (:mod:`karma.params`) and the stage's paths class, so
the command line, ``params.yaml`` and the DVC stage script cannot disagree.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import click
import yaml

from karma.core.errors import KarmaError
from karma.core.settings import (
    bounds,
    describe,
    is_operational,
    load_yaml,
    plain,
    sources,
    yaml_problem,
)
from karma.core.stage import (
    ROLE_NAMES,
    Stage,
    execute,
    is_main_process,
    load_stage,
    path_fields,
    required_fields,
)
from karma.params import Params, build_params, field_at, field_info, with_source

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_text(annotation: Any) -> bool:
    args = set(typing.get_args(annotation)) or {annotation}
    return str in args and args <= {str, type(None)}


def parse_value(key: str, raw: str, label: str | None = None) -> Any:
    """A command-line value for params key ``key``: text fields verbatim, others as YAML
    (bounded: no aliases, no deep nesting, no huge integers, no duplicate keys)."""
    found = field_at(key)
    annotation = found[0].model_fields[found[1]].annotation if found else None
    is_leaf = found is not None and found[1] == key.rsplit(".", 1)[-1]
    if is_leaf and _is_text(annotation):
        return None if raw in ("null", "~") and type(None) in typing.get_args(annotation) else raw
    try:
        return load_yaml(raw)
    except yaml.constructor.ConstructorError as err:
        raise KarmaError(yaml_problem(err, "refused").removeprefix("line 1: "),
                         field=label or key) from None  # fmt: skip
    except yaml.YAMLError:
        return raw


def _help(key: str) -> str:
    info = field_info(key)
    found = field_at(key)
    assert found is not None
    default = getattr(found[0](), found[1])
    shown = json.dumps(plain(default))
    extra = describe(info.annotation)
    rng = bounds(info, "x")
    text = f"{info.description} [{extra}{'; ' + rng if rng else ''}; default: {shown}]"
    if is_operational(info):
        text += " (operational)"
    return text


def _metavar(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "NAME"
    simple = {int: "INT", float: "FLOAT", str: "TEXT"}
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return simple.get(args[0], "YAML") if len(args) == 1 else "YAML"


def _setting_options(stage: Stage) -> dict[str, str]:
    """Option name -> params key, for every setting of the stage."""
    out: dict[str, str] = {}
    for key in stage.setting_keys(Params):
        name = key.rsplit(".", 1)[-1]
        if name in out:
            raise KarmaError("two settings share an option name", field=name, value=key)
        out[name] = key
    return out


def _path_options(stage: Stage) -> list[click.Parameter]:
    required = required_fields(stage.paths)
    out: list[click.Parameter] = []
    for f in path_fields(stage.paths):
        meta = f.metadata
        kind = meta["role"]
        metavar = "TEXT" if kind == "arg" else ("DIR" if meta["is_dir"] else "FILE")
        out.append(click.Option([_flag(f.name)], metavar=metavar, required=f.name in required,
                                help=f"{meta['help']} ({ROLE_NAMES[kind]})"))  # fmt: skip
    return out


def _settings_params(options: dict[str, str]) -> list[click.Parameter]:
    out: list[click.Parameter] = [
        click.Option(
            ["--params", "params_file"],
            metavar="FILE",
            help="Read settings from this params file (default: the built-in defaults, "
            "which are those of the committed params.yaml). Flags override it.",
        )
    ]
    for name, key in options.items():
        info = field_info(key)
        if info.annotation is bool:
            decls = [f"{_flag(name)}/--no-{name.replace('_', '-')}"]
            out.append(click.Option(decls, default=None, help=_help(key)))
        else:
            out.append(click.Option([_flag(name)], metavar=_metavar(info.annotation),
                                    default=None, help=_help(key)))  # fmt: skip
    out.append(
        click.Option(
            ["-S", "--set", "assignments"],
            multiple=True,
            metavar="KEY=VALUE",
            help="Set any params key, e.g. -S train.trl.max_steps=20 (as dvc exp run -S).",
        )
    )
    return out


def _overrides(options: dict[str, str], kwargs: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """``(key, value, flag)`` of every setting given on the command line."""
    out: list[tuple[str, Any, str]] = []
    for name, key in options.items():
        raw = kwargs.get(name)
        if raw is not None:
            value = raw if isinstance(raw, bool) else parse_value(key, raw, _flag(name))
            out.append((key, value, _flag(name)))
    for item in kwargs.get("assignments", ()):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise KarmaError("expects KEY=VALUE", field="-S", value=item)
        label = f"-S {key.strip()}"
        out.append((key.strip(), parse_value(key.strip(), raw, label), label))
    return out


def make_command(stage: Stage, command_name: str, short_help: str, *, settings: bool) -> Any:
    """The click command of a stage: path options, and with ``settings`` the params options."""
    path_names = {f.name for f in path_fields(stage.paths)}
    options = _setting_options(stage) if settings else {}
    clash = set(options) & path_names
    if clash:
        raise KarmaError("a setting and a path share an option name", value=sorted(clash))
    params = _path_options(stage) + (_settings_params(options) if settings else [])

    def callback(**kwargs: Any) -> None:
        flags = {f.name: _flag(f.name) for f in path_fields(stage.paths)}
        flags.update({key: _flag(name) for name, key in options.items()})
        paths = stage.paths(**{k: kwargs.pop(k) for k in path_names})
        if settings:
            file, overrides = kwargs.pop("params_file"), _overrides(options, kwargs)
        else:
            file, overrides = "params.yaml", []
        params_obj = build_params(file, overrides)
        try:
            metrics = execute(stage, params_obj, paths, flag=lambda n: flags.get(n, n))
        except KarmaError as err:  # a params key named by the library: say where it was set
            raise with_source(err, sources(file, overrides)) from None
        if settings and metrics is not None and is_main_process():
            click.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        if stage.exit_fast:
            _EXIT_FAST.add(stage.name)

    return click.Command(
        command_name,
        params=params,
        callback=callback,
        help=f"{short_help}\n\n{stage.help}".strip(),
        short_help=short_help,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )


#: Stages that succeeded in this process and declared ``exit_fast`` (:func:`finish_process`).
_EXIT_FAST: set[str] = set()


def finish_process() -> None:
    """At the end of a process entry point: when the command that ran was a stage that declared
    ``exit_fast`` and it succeeded, flush the output streams and the log and end the process
    at once (``os._exit(0)``), skipping the interpreter's teardown; else return."""
    if not _EXIT_FAST:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; INFO by default, DEBUG with ``-v`` or ``KARMA_DEBUG=1``."""
    level = logging.DEBUG if verbose or os.environ.get("KARMA_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def run_click(command: click.Command, argv: Sequence[str] | None, *, prog: str) -> None:
    """Run a click command with the error contract: one line on stderr, exit 1 (2: usage).

    An unexpected exception is a bug: one line too (its type and first line), with the
    traceback under ``KARMA_DEBUG=1``.
    """
    old = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: as Ctrl-C
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name=prog,
                     standalone_mode=False)  # fmt: skip
    except KarmaError as err:
        click.echo(f"karma: error: {err}", err=True)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click wraps Ctrl-C in Abort
        if isinstance(err, Terminated) or isinstance(err.__cause__, Terminated):
            click.echo("karma: aborted (SIGTERM); temporary outputs removed", err=True)
            sys.exit(128 + signal.SIGTERM)
        click.echo("karma: aborted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        click.echo(f"karma: error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"karma: error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:
        if os.environ.get("KARMA_DEBUG"):
            raise
        from karma.core.io import short_reason

        click.echo(f"karma: internal error: {type(err).__name__}: {short_reason(err)} "
                   "(KARMA_DEBUG=1 shows the traceback)", err=True)  # fmt: skip
        sys.exit(1)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, schedulers, ``docker stop``): unwinds like Ctrl-C, so every
    temporary output is removed and the output locks released."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not interrupted
    raise Terminated


#: A measured model's name: what ``dvc.yaml`` may put in a path (never in a command).
MEASURED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def measured_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The arguments of ``benchmark@<name>``: its name from DVC (``DVC_STAGE``), its outputs
    under the two directories ``argv`` gives (``--measured-dir D --samples-dir S``); the stage
    reads the model from params (``scores.measured.<name>``). No value of params.yaml is ever
    shell text: the ``dvc.yaml`` command holds only the fixed paths of its ``vars``.
    """
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    stage = env.get("DVC_STAGE", "")
    name = stage.partition("@")[2]
    if not MEASURED_NAME.fullmatch(name):
        raise KarmaError("not a measured model's name", field="DVC_STAGE", value=stage or None,
                         expected="benchmark@<name>, name of [A-Za-z0-9_-]")  # fmt: skip
    missing = [k for k in ("--measured-dir", "--samples-dir") if not opts.get(k)]
    if missing:
        raise KarmaError("missing option", field=missing[0], expected="a directory")
    return ["--name", name, "--out", f"{opts['--measured-dir']}/{name}.json",
            "--samples", f"{opts['--samples-dir']}/{name}.parquet"]  # fmt: skip


def generations_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The arguments of ``generate@<name>``: its name from DVC (``DVC_STAGE``), its output in
    ``--generations-dir``; the model comes from params (as :func:`measured_argv`)."""
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    stage = env.get("DVC_STAGE", "")
    name = stage.partition("@")[2]
    if not MEASURED_NAME.fullmatch(name):
        raise KarmaError("not a pool model's name", field="DVC_STAGE", value=stage or None,
                         expected="generate@<name>, name of [A-Za-z0-9_-]")  # fmt: skip
    missing = [k for k in ("--prompts", "--generations-dir") if not opts.get(k)]
    if missing:
        raise KarmaError("missing option", field=missing[0], expected="a path")
    return ["--name", name, "--prompts", opts["--prompts"],
            "--out", f"{opts['--generations-dir']}/{name}.parquet"]  # fmt: skip


#: Stage instances whose name reaches them only through DVC: stage -> (marker flag, argv).
INSTANCE_ARGV = {
    "benchmark": ("--measured-dir", measured_argv),
    "generate": ("--generations-dir", generations_argv),
}


def stage_main(ref: str) -> None:
    """Entry point of ``stages/<name>.py``: paths from ``dvc.yaml``, settings from params.yaml."""
    setup_logging()
    stage = load_stage(ref)
    command = make_command(stage, f"stages/{stage.name}", stage.help, settings=False)
    argv = sys.argv[1:]
    if stage.name in INSTANCE_ARGV and INSTANCE_ARGV[stage.name][0] in argv:  # <stage>@<name>
        try:
            argv = INSTANCE_ARGV[stage.name][1](argv, os.environ)
        except KarmaError as err:
            click.echo(f"karma: error: {err}", err=True)
            sys.exit(1)
    run_click(command, argv, prog=f"stage {stage.name}")
    finish_process()
