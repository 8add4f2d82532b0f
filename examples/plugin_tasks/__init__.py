"""A task list as a chatkit-pg plugin: a tool showing a widget, and its two widget actions."""
