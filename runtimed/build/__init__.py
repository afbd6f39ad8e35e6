"""`runtimectl build`: Dockerfiles built through the daemon's API (Content, Snapshots, Diff, Tasks,
Leases, Images), with a build cache the garbage collector understands.

- dockerfile: the parser (directives, continuations, instructions, flags, forms)
- shell: variable substitution as docker's shell lexer does it
- context: the build context, .dockerignore, COPY sources and their content digest
- rootfs: writing into a mounted root filesystem without leaving it; users; ADD's tar extraction
- cache: cache records in the content store (see its docstring for why there)
- api: the daemon's services under the build's lease
- executor: the steps, the layers and the image
"""
