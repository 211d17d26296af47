"""Every option and argument of every command says what it is for in --help."""

import argparse

from layerstream.cli import build_parser


def test_every_flag_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    assert len(sub.choices) >= 8   # run, chat, batch, serve, split, info, verify, plan
