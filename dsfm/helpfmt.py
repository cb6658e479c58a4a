"""--help for every dsfm and perf command: each option's default said beside it.

argparse's own ArgumentDefaultsHelpFormatter appends "(default: ...)" to options whose help
states it already, and to switches ("default: False"); this one only where the help does not
name a default and the option has one to name."""

from __future__ import annotations

import argparse
import copy


def shown_default(action: argparse.Action) -> str | None:
    """What "(default: ...)" names for `action`, None where its help has nothing to add."""
    default = action.default
    empty = isinstance(default, (str, list, tuple)) and len(default) == 0
    if (default is None or default is False or empty or default == argparse.SUPPRESS
            or not action.option_strings or "default" in (action.help or "").lower()
            or isinstance(action, (argparse._StoreConstAction, argparse._HelpAction,
                                   argparse._VersionAction))):
        return None
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


class _DefaultsShown:
    def _format_action(self, action):
        shown = shown_default(action)
        if not (action.help or "").strip() and shown is not None:
            action = copy.copy(action)      # argparse lists an option without help bare
            action.help = f"(default: {shown.replace('%', '%%')})"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        shown = shown_default(action)
        if shown is None:
            return action.help
        shown = shown.replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class HelpFormatter(_DefaultsShown, argparse.HelpFormatter):
    """argparse's formatter (descriptions rewrapped), defaults shown."""


class RawHelpFormatter(_DefaultsShown, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (their paragraphs and tables kept), defaults shown."""
