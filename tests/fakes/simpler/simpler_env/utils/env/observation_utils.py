def get_image_from_maniskill2_obs_dict(env, obs, camera_name=None):
    """The real getter: the overhead camera for the Google robot."""
    if camera_name is None:
        if "google_robot" in env.robot_uid:
            camera_name = "overhead_camera"
        else:
            raise NotImplementedError()
    return obs["image"][camera_name]["rgb"]
