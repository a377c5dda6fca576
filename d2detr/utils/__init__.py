"""Small helpers shared by the tools."""
from .results_json import base_method, command_line, display_label, is_seed_run, load_results, save_results

__all__ = ["base_method", "command_line", "display_label", "is_seed_run", "load_results", "save_results"]
