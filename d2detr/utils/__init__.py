"""Small helpers shared by the tools."""
from .results_json import command_line, is_seed_run, load_results, save_results

__all__ = ["command_line", "is_seed_run", "load_results", "save_results"]
