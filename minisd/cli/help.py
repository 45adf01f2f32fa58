"""The help text of every command: argparse's, with each flag's default shown."""
import argparse
import copy


def _worth_showing(action):
    """A default that says something: not for positionals, flags that are off (False), or unset ones (None)."""
    return (action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already speaks of its default. argparse's own
    ArgumentDefaultsHelpFormatter skips flags without help and writes "(default: None)" for unset ones."""

    def add_argument(self, action):
        if action.help is None and _worth_showing(action):
            action = copy.copy(action)          # argparse shows nothing for a flag without help: give it one
            action.help = ""
        super().add_argument(action)

    def _format_action(self, action):
        if action.help is not None and _worth_showing(action) and "default" not in action.help:
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)".lstrip()
        return super()._format_action(action)
