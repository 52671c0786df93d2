"""kubectl_complete-blockcopy without an API server: subcommands, flags and flag values from
the plugin's parser, in the format kubectl (>= 1.26) reads (one candidate a line, a tab
before its description, then Cobra's `:directive`). Names from the real API server, through
the real kubectl: tests/e2e/test_kubectl_output_on_server.py."""

from __future__ import annotations

import pytest

from blockcopy.kubectl import completion, main
from blockcopy.kubectl.names import PHASES
from blockcopy.kubectl.output import FORMATS

PARSER = main.build_parser()


def values(*args: str) -> tuple[list[str], int]:
    found, directive = completion.complete(args, PARSER)
    return [v for v, _ in found], directive


def test_subcommands_with_their_help():
    found, directive = completion.complete([""], PARSER)
    assert [v for v, _ in found] == ["move", "list", "status", "pivot", "abort", "wait",
                                     "version", "plan"]
    assert dict(found)["wait"] == "wait until BlockCopies reach a phase"
    assert directive == completion.NO_FILES


def test_flags_of_the_subcommand_and_the_connection():
    flags, directive = values("list", "--")
    assert {"--output", "--watch", "--all-namespaces", "--group", "--namespace",
            "--kubeconfig", "--context"} <= set(flags)
    assert "--for" not in flags and directive == completion.NO_FILES
    assert "--for" in values("wait", "a", "-")[0] and "-h" not in values("wait", "-")[0]
    assert "--version" in values("-")[0]


@pytest.mark.parametrize("args, expected", [
    (("list", "-o", ""), list(FORMATS)),
    (("status", "x", "--output", "w"), list(FORMATS)),
    (("wait", "x", "--for", ""), list(PHASES)),
    (("wait", "--timeout", "5m", "--for", "P"), list(PHASES)),
    (("version", "-o", ""), ["table", "json", "yaml"]),
])
def test_flag_values(args, expected):
    assert values(*args) == (expected, completion.NO_FILES)


def test_flag_equals_value():
    found, _ = values("wait", "x", "--for=Mir")
    assert found == [f"--for={p}" for p in PHASES]


def test_paths_are_left_to_the_shell():
    assert values("move", "vm", "--to", "") == ([], completion.DIRS)
    assert values("list", "--kubeconfig", "") == ([], completion.DEFAULT)


def test_flags_before_the_subcommand_and_boolean_flags_take_no_value():
    assert values("-n", "vms", "")[0][0] == "move"
    words = completion.Words(["--namespace=vms", "--context", "c", "status", "-w", "a"], PARSER)
    assert (words.command, words.options, words.positionals, words.pending) == (
        "status", {"namespace": "vms", "context": "c"}, ["a"], None)


def test_main_prints_the_candidates_matching_the_word_and_the_directive(capsys):
    assert completion.main(["st"]) == 0
    assert capsys.readouterr().out == "status\tshow BlockCopies with their messages\n:4\n"
    assert main.main(["__complete", "list", "-o", "y"]) == 0  # kubectl-blockcopy __complete
    assert capsys.readouterr().out == "yaml\n:4\n"


def test_names_without_a_reachable_api_server_complete_nothing(tmp_path, capsys):
    # An unreadable kubeconfig: no candidates, no error, no hang.
    assert completion.main(["status", "--kubeconfig", str(tmp_path / "none"), ""]) == 0
    assert capsys.readouterr().out == ":4\n"
