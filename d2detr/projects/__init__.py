"""Makes `projects/<name>` importable as `d2detr.projects.<name>`.

Detectron2 does the same for its own `projects/`: an installed wheel maps the
folders through `package_dir` in setup.py; in a source checkout (editable
install or PYTHONPATH) we extend this package's search path to the checkout's
`projects/` folder.
"""
import os

_checkout_projects = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "projects"
)
if os.path.isdir(_checkout_projects) and _checkout_projects not in __path__:
    __path__.append(_checkout_projects)
