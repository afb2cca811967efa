"""Scale-out on Ray (optional extra `pip install -e '.[ray]'`): batch rendering on Ray actors (`batch`) and
live streams on Ray Serve replicas (`serve_app`). Ray is imported lazily, only by the features that use it."""
from __future__ import annotations

from ..errors import LipsyncError

INSTALL_HINT = "pip install -e '.[ray]'"


class RayUnavailable(LipsyncError):
    """Ray (or Ray Serve) is not installed, or the Ray cluster cannot be reached."""


def require_ray(feature: str, serve: bool = False):
    """Import and return the `ray` module, or raise RayUnavailable naming the extra to install."""
    try:
        import ray
        if serve:
            import ray.serve  # noqa: F401
    except ImportError as exc:
        what = "ray[serve]" if serve else "ray"
        raise RayUnavailable(f"{feature} needs {what}, which is not installed here ({exc.name or exc}); "
                             f"install it with: {INSTALL_HINT}") from None
    return ray


def ray_missing_reason(serve: bool = False) -> str | None:
    """Why the Ray features cannot run here (for tests' skip reasons), or None when they can."""
    try:
        require_ray("this", serve=serve)
    except RayUnavailable as exc:
        return str(exc)
    return None
