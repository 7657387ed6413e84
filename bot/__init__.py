"""blender-chat: a Discord and Slack bot answered by BlenderBot running locally."""

__version__ = "0.1.0"
