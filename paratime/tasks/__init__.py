"""Control tasks for diffusion policies, made in code (pure torch; nothing here imports from paratime).

``reach``: a 2-D point robot, a goal and obstacles, with a scripted expert that passes each obstacle on a random side.
"""

from .reach import ReachConfig, Episodes, make_dataset, make_episodes

__all__ = ["ReachConfig", "Episodes", "make_dataset", "make_episodes"]
