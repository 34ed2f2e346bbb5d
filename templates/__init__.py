# Triton kernel templates (Jinja2); rendered by tidal_compile.codegen (planned).
