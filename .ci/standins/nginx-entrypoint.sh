#!/bin/sh
# The part of the official nginx image's entrypoint that docker-compose.yml relies on, for the
# stand-in built from Debian's nginx (.ci/standins/build.sh): before nginx starts, every
# /etc/nginx/templates/**/*.template is rendered with envsubst into /etc/nginx/conf.d/ (same
# relative path, suffix dropped), substituting only variables that are set in the environment,
# and of those only the names matching the extended regular expression NGINX_ENVSUBST_FILTER
# when it is set. The directories and suffix follow the same NGINX_ENVSUBST_* variables. The
# official image's other start-up steps (IPv6 listen rewrite of its own default.conf, local
# resolvers, worker autotune) are not reproduced: the compose file does not use them.
set -eu
case "${1:-}" in
  nginx|nginx-debug)
    templates=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
    suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
    out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
    filter=${NGINX_ENVSUBST_FILTER:-}
    if [ -d "$templates" ]; then
      names=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' | grep -E -- "${filter:-.}" || true)
      shell_format=$(for name in $names; do printf '${%s} ' "$name"; done)
      find "$templates" -follow -type f -name "*$suffix" | while read -r template; do
        relative=${template#"$templates"/}
        target="$out/${relative%"$suffix"}"
        mkdir -p "$(dirname "$target")"
        echo "$0: rendering $template to $target"
        envsubst "$shell_format" < "$template" > "$target"
      done
    fi
    ;;
esac
exec "$@"
