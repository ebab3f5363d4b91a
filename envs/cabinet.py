"""A two-drawer cabinet built from box primitives (no downloaded assets).

Cabinet frame: origin at the centre of its footprint on the table, front face at +x (depth/2),
drawers slide out along +x. Tasks place it with yaw π so the front faces the robot (world −x).
Only the top drawer is articulated (one prismatic joint, qpos = metres open); the bottom drawer is
a fixed front panel with a handle, so the scene reads as a cabinet with a top and a bottom drawer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sapien

WOOD = (0.55, 0.38, 0.22, 1.0)
FRONT = (0.72, 0.52, 0.32, 1.0)
METAL = (0.15, 0.15, 0.18, 1.0)


@dataclass(frozen=True)
class CabinetGeometry:
    """Sizes in metres. The handle bar stands `handle_standoff` off the drawer front so closed
    fingers pointing down fit between bar and front (the experts hook the bar from above)."""

    depth: float = 0.30
    width: float = 0.36
    height: float = 0.30
    wall: float = 0.015
    gap: float = 0.004  # clearance between drawer and carcass so they never touch
    travel: float = 0.25  # top drawer joint limit: [0, travel]
    handle_length: float = 0.14
    handle_thickness: float = 0.015
    handle_standoff: float = 0.07  # front face to bar centre; the hand's palm must fit in front of the face
    joint_damping: float = 10.0  # N·s/m; a slow-moving drawer, as real drawer runners are
    joint_friction: float = 0.5  # N; keeps a released drawer where the gripper left it

    @property
    def drawer_front_height(self) -> float:
        return self.height / 2 - 1.5 * self.wall - 2 * self.gap

    @property
    def top_drawer_z(self) -> float:
        """Height of the top drawer's (and handle's) centre above the table."""
        return 0.75 * self.height - 0.25 * self.wall

    def handle_offset_in_drawer(self) -> np.ndarray:
        """Handle bar centre in the drawer link frame (origin = drawer front face centre, closed)."""
        return np.array([self.handle_standoff, 0.0, 0.0])


def _box(builder, center, half_size, color, collision: bool = True) -> None:
    pose = sapien.Pose(p=list(center))
    if collision:
        builder.add_box_collision(pose=pose, half_size=list(half_size))
    builder.add_box_visual(
        pose=pose, half_size=list(half_size),
        material=sapien.render.RenderMaterial(base_color=list(color)),
    )


def _handle(builder, center_x: float, center_z: float, g: CabinetGeometry, collision: bool) -> None:
    """Bar along y at (center_x, 0, center_z) plus two posts back to the front face at center_x − standoff."""
    half_t = g.handle_thickness / 2
    _box(builder, (center_x, 0.0, center_z), (half_t, g.handle_length / 2, half_t), METAL, collision)
    post_len = g.handle_standoff - half_t
    for y in (-g.handle_length / 2 + half_t, g.handle_length / 2 - half_t):
        _box(builder, (center_x - half_t - post_len / 2, y, center_z),
             (post_len / 2, half_t * 0.8, half_t * 0.8), METAL, collision)


def build_cabinet(scene, name: str, g: CabinetGeometry = CabinetGeometry(), initial_pose=None):
    """Build the cabinet articulation; returns it. The top drawer link is named f"{name}_top_drawer"."""
    builder = scene.create_articulation_builder()
    builder.initial_pose = initial_pose if initial_pose is not None else sapien.Pose()
    d, w, h, t = g.depth, g.width, g.height, g.wall

    body = builder.create_link_builder()
    body.set_name(f"{name}_body")
    _box(body, (0, 0, t / 2), (d / 2, w / 2, t / 2), WOOD)  # bottom
    _box(body, (0, 0, h - t / 2), (d / 2, w / 2, t / 2), WOOD)  # top
    _box(body, (0, 0, h / 2), (d / 2 - t, w / 2 - t, t / 2), WOOD)  # shelf between drawers
    _box(body, (-d / 2 + t / 2, 0, h / 2), (t / 2, w / 2, h / 2), WOOD)  # back
    for side in (-1, 1):
        _box(body, (0, side * (w / 2 - t / 2), h / 2), (d / 2, t / 2, h / 2), WOOD)
    # Bottom drawer: a fixed panel that only looks like a drawer (no joint, so nothing to simulate).
    bottom_z = 0.25 * h + 0.25 * t
    _box(body, (d / 2 - t / 2, 0, bottom_z), (t / 2, w / 2 - t - g.gap, g.drawer_front_height / 2), FRONT)
    _handle(body, d / 2 + g.handle_standoff, bottom_z, g, collision=True)

    drawer = builder.create_link_builder(body)
    drawer.set_name(f"{name}_top_drawer")
    fh = g.drawer_front_height
    inner_w = w / 2 - t - g.gap  # half width of the drawer
    tray_depth = d - 2 * t - g.gap
    _box(drawer, (-t / 2, 0, 0), (t / 2, inner_w, fh / 2), FRONT)  # front panel
    _box(drawer, (-t - tray_depth / 2, 0, -fh / 2 + t / 2), (tray_depth / 2, inner_w, t / 2), WOOD)  # tray
    _box(drawer, (-t - tray_depth + t / 2, 0, 0), (t / 2, inner_w, fh / 2), WOOD)  # back
    for side in (-1, 1):
        _box(drawer, (-t - tray_depth / 2, side * (inner_w - t / 2), 0), (tray_depth / 2, t / 2, fh / 2), WOOD)
    _handle(drawer, g.handle_standoff, 0.0, g, collision=True)
    drawer.set_joint_name(f"{name}_top_drawer_joint")
    drawer.set_joint_properties(
        type="prismatic",
        limits=[[0.0, g.travel]],
        # Joint frame at the closed drawer's front-face centre; prismatic joints slide along +x.
        pose_in_parent=sapien.Pose(p=[d / 2, 0.0, g.top_drawer_z]),
        pose_in_child=sapien.Pose(),
        friction=g.joint_friction,
        damping=g.joint_damping,
    )
    cabinet = builder.build(name=name, fix_root_link=True)
    # set_joint_properties drops friction on ManiSkill 3.0.1; set it on the built joint.
    joint = cabinet.active_joints[0]
    joint.set_friction(g.joint_friction)
    joint.set_drive_properties(stiffness=0.0, damping=g.joint_damping)
    return cabinet
