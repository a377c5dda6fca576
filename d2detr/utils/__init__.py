"""Small helpers shared by the tools."""
from .results_json import load_results, save_results

__all__ = ["load_results", "save_results"]
