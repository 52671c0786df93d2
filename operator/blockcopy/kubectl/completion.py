"""Shell completion for ``kubectl blockcopy``: the console script
``kubectl_complete-blockcopy``, which kubectl (1.26 and later) runs from PATH when the user
presses TAB after ``kubectl blockcopy``, with the words after the plugin's name, the last one
the word being completed (possibly empty).

It answers as Cobra programs answer ``__complete``: one candidate a line (a tab, then a
description), then ``:N``, the Cobra directive (4: no file names; 0: file names; 16:
directories only). Subcommands, flags and their fixed values come from the plugin's own
parser (so they cannot drift from it); BlockCopy names, groups, namespaces, nodes and
kubeconfig contexts from the kubeconfig and the API server, within a few seconds or not at all."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from blockcopy.kubectl.main import build_parser
from blockcopy.kubectl.names import PHASES
from blockcopy.kubectl.plantext import WAIT_FOR
from blockcopy.kubectl.text import group_of
from blockcopy.model.api import GROUP, PLURAL, VERSION, Verify
from blockcopy.model.plan import PLAN_PLURAL, PivotMode, Retention

# Cobra's ShellCompDirective values.
DEFAULT, NO_FILES, DIRS = 0, 4, 16
API_SECONDS = 5  # the API server is asked with this timeout: a TAB must not hang
Candidates = list[tuple[str, str]]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


class Words:
    """The words before the one being completed, read as the plugin would read them (a
    subcommand's own subcommand, as ``plan create``, included)."""

    def __init__(self, words: Sequence[str], top: argparse.ArgumentParser):
        self.command: str | None = None
        self.subcommand: str | None = None
        self.options: dict[str, str] = {}
        self.positionals: list[str] = []
        self.pending: argparse.Action | None = None  # a flag whose value is being typed
        subs = _subparsers(top)
        flags = _flags(top)
        for word in words:
            if self.pending is not None and self.pending.nargs == "?" and word.startswith("-"):
                self.pending = None  # an optional value not given (--dry-run --from ...)
            if self.pending is not None:
                self.options[self.pending.dest] = word
                self.pending = None
            elif word.startswith("-") and word != "-":
                name, eq, value = word.partition("=")
                action = flags.get(name)
                if action is not None and action.nargs != 0:
                    if eq:
                        self.options[action.dest] = value
                    else:
                        self.pending = action
            elif self.command is None and word in subs:
                self.command = word
                flags = {**flags, **_flags(subs[word])}
                subs = _subparsers(subs[word])
            elif self.command is not None and self.subcommand is None and word in subs:
                self.subcommand = word
                flags = {**flags, **_flags(subs[word])}
            else:
                self.positionals.append(word)


def _api(words: Words, call: Callable[[Any, dict[str, Any]], list[str]]) -> list[str]:
    """What ``call(cluster, timeout keywords)`` finds, or nothing on any error."""
    try:
        from blockcopy.kubectl.cluster import Cluster

        cluster = Cluster(words.options.get("kubeconfig"), words.options.get("context"))
        return call(cluster, {"_request_timeout": API_SECONDS})
    except Exception:
        return []


def _namespace_of(words: Words, cluster: Any) -> str:
    return words.options.get("namespace") or str(cluster.default_namespace)


def blockcopies(words: Words, plural: str = PLURAL) -> list[dict[str, Any]]:
    """The BlockCopies (or ``plural``: the plans) of the namespace the words name."""
    found: list[dict[str, Any]] = []

    def call(cluster: Any, kw: dict[str, Any]) -> list[str]:
        listed = cluster.api.list_namespaced_custom_object(
            GROUP, VERSION, _namespace_of(words, cluster), plural, **kw)
        found.extend(listed.get("items") or [])
        return []
    _api(words, call)
    return found


def namespaces(words: Words) -> list[str]:
    def call(cluster: Any, kw: dict[str, Any]) -> list[str]:
        import kubernetes

        core = kubernetes.client.CoreV1Api(cluster.api.api_client)
        return [str(n.metadata.name) for n in core.list_namespace(**kw).items if n.metadata]
    return _api(words, call)


def nodes(words: Words) -> list[str]:
    def call(cluster: Any, kw: dict[str, Any]) -> list[str]:
        import kubernetes

        core = kubernetes.client.CoreV1Api(cluster.api.api_client)
        return [str(n.metadata.name) for n in core.list_node(**kw).items if n.metadata]
    return _api(words, call)


def contexts(words: Words) -> list[str]:
    try:
        import kubernetes

        listed, _ = kubernetes.config.list_kube_config_contexts(
            config_file=words.options.get("kubeconfig"))
        return [c["name"] for c in listed]
    except Exception:
        return []


def values(action: argparse.Action, words: Words) -> tuple[Candidates, int]:
    """Candidates for the value of ``action``'s flag, and the directive."""
    if action.choices is not None:
        return [(str(c), "") for c in action.choices], NO_FILES
    if action.dest == "phase":
        return [(p, "") for p in PHASES], NO_FILES
    if action.dest == "plan_phase":
        return [(p, "") for p in WAIT_FOR], NO_FILES
    if action.dest in ("pivot", "source_retention", "verify"):
        kind = {"pivot": PivotMode, "source_retention": Retention, "verify": Verify}[action.dest]
        return [(m.value, "") for m in kind], NO_FILES
    if action.dest == "group":
        groups = sorted({g for o in blockcopies(words) if (g := group_of(o))})
        return [(g, "group") for g in groups], NO_FILES
    if action.dest == "namespace":
        return [(n, "") for n in namespaces(words)], NO_FILES
    if action.dest == "node":
        return [(n, "node") for n in nodes(words)], NO_FILES
    if action.dest == "context":
        return [(c, "") for c in contexts(words)], NO_FILES
    if action.dest == "kubeconfig":
        return [], DEFAULT
    if action.dest in ("to", "source", "dest"):
        return [], DIRS
    return [], NO_FILES


def complete(args: Sequence[str], parser: argparse.ArgumentParser) -> tuple[Candidates, int]:
    """Candidates for the last of ``args`` (the words after ``kubectl blockcopy``)."""
    *before, current = list(args) or [""]
    words = Words(before, parser)
    subs = _subparsers(parser)
    here = subs[words.command] if words.command else parser
    inner = _subparsers(here) if words.command else {}
    if words.subcommand:
        here = inner[words.subcommand]
    if words.pending is not None:
        return values(words.pending, words)
    if current.startswith("--") and "=" in current:
        flag, _, _ = current.partition("=")
        action = _flags(here).get(flag) or _flags(parser).get(flag)
        if action is None or action.nargs == 0:
            return [], NO_FILES
        found, directive = values(action, words)
        return [(f"{flag}={v}", d) for v, d in found], directive
    if current.startswith("-"):
        return [(opt, action.help or "") for opt, action in _flags(here).items()
                if action.help != argparse.SUPPRESS and opt not in ("-h",)], NO_FILES
    if words.command is None:
        return [(name, _help(parser, name)) for name in subs], NO_FILES
    if inner and words.subcommand is None:
        return [(name, _help(subs[words.command], name)) for name in inner], NO_FILES
    given = set(words.positionals)
    if words.command == "plan" and words.subcommand in ("status", "pivot", "start", "wait"):
        return [(o["metadata"]["name"], (o.get("status") or {}).get("phase") or "")
                for o in blockcopies(words, PLAN_PLURAL)
                if o["metadata"]["name"] not in given], NO_FILES
    if words.command in ("status", "pivot", "abort", "wait"):
        found = [(o["metadata"]["name"], (o.get("status") or {}).get("phase") or "")
                 for o in blockcopies(words) if o["metadata"]["name"] not in given]
        if words.command == "pivot" and current.startswith("p"):  # pivot plan/NAME
            found += [(f"plan/{o['metadata']['name']}", "plan "
                       + ((o.get("status") or {}).get("phase") or ""))
                      for o in blockcopies(words, PLAN_PLURAL)
                      if f"plan/{o['metadata']['name']}" not in given]
        return found, NO_FILES
    return [], NO_FILES


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["__complete"]:  # called as Cobra programs are, by hand
        args = args[1:]
    current = args[-1] if args else ""
    found, directive = complete(args, build_parser())
    for value, description in found:
        if value.startswith(current):
            print(f"{value}\t{description}" if description else value)
    print(f":{directive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
