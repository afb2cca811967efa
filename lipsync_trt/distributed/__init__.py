"""Scale-out on Ray (optional extra `pip install -e '.[ray]'`): batch rendering on Ray actors (`batch`) and
live streams on Ray Serve replicas (`serve_app`). Ray is imported lazily, only by the features that use it."""
from __future__ import annotations

from ..errors import LipsyncError

INSTALL_HINT = "pip install -e '.[ray]'"


class RayUnavailable(LipsyncError):
    """Ray (or Ray Serve) is not installed, or the Ray cluster cannot be reached."""


def _missing(serve: bool) -> str | None:
    """The module that fails to import ('ray', 'ray.serve', one of their dependencies), or None."""
    try:
        import ray  # noqa: F401
        if serve:
            from ray import serve as _serve  # noqa: F401
    except ImportError as exc:
        return exc.name or str(exc)
    return None


def ray_missing_reason(serve: bool = False) -> str | None:
    """Why the Ray features cannot run here (tests' skip reason), or None when they can."""
    name = _missing(serve)
    what = "ray[serve]" if serve else "ray"
    return None if name is None else f"{what} is not installed here ({name}); install it with: {INSTALL_HINT}"


def require_ray(feature: str, serve: bool = False):
    """Import and return the `ray` module, or raise RayUnavailable naming the feature and the extra to install."""
    name = _missing(serve)
    if name is not None:
        what = "ray[serve]" if serve else "ray"
        raise RayUnavailable(f"{feature} needs {what}, which is not installed here ({name}); install it with: "
                             f"{INSTALL_HINT}")
    import ray

    return ray
