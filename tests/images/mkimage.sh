# mkimage REF OUT ROOTFS ENTRYPOINT_JSON [ENV_JSON]: writes OUT, a docker-archive tar (what
# `ctr images import` takes) of one layer made from ROOTFS. Reproducible: fixed mtimes, owners
# and order. Sourced by the image build scripts; needs $work, a scratch directory.
mkimage() {
  local ref=$1 out=$2 rootfs=$3 ep=$4 env=${5:-'["PATH=/bin"]'} w lsha csha
  w=$(mktemp -d -p "$work")
  tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$rootfs" -cf "$w/layer.tar" .
  lsha=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
  mkdir "$w/$lsha"
  mv "$w/layer.tar" "$w/$lsha/layer.tar"
  printf '{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Entrypoint":%s,"Env":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"tests/images/build-images.sh"}]}' \
    "$ep" "$env" "$lsha" > "$w/config.json"
  csha=$(sha256sum "$w/config.json" | cut -d' ' -f1)
  mv "$w/config.json" "$w/$csha.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]\n' "$csha" "$ref" "$lsha" > "$w/manifest.json"
  tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$w" -cf "$out.tmp" manifest.json "$csha.json" "$lsha"
  mv "$out.tmp" "$out"
}

