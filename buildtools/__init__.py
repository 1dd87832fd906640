"""The pieces behind ``build.py`` (the command line the README names): standard library only.

    common.py    repository paths, supported platforms/Pythons, manifest rules, project facts
    wheels.py    the pyzmq wheel cache (``pip download``), hash-checked
    package.py   the extension zip, the legacy zip and the backend wheel
    checks.py    static checks, Blender's validator, installs into bpy 5.0.1 and Blender 3.4
    probes/      the scripts those installs run inside Blender (real files, not strings)
"""
