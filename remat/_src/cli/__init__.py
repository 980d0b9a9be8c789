"""The command line: cli (the entry point) -> cli_fit -> cli_model -> cli_util.
"""
