#!/usr/bin/env bash
# Provisions a coordinator host: the service user, folders, the project CA and the admin
# identity (never re-minting an existing CA), and the config. Idempotent. Run as root.
# Usage: deploy/provision.sh [HOSTNAME...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ctl=${FLEXFEDCTL:-/usr/local/bin/flexfedctl}
[[ $(id -u) -eq 0 ]] || { echo "provision.sh: run as root (it creates a system user and /etc/flexfed)" >&2; exit 1; }
id flexfed >/dev/null 2>&1 || useradd --system --home /var/lib/flexfed --shell /usr/sbin/nologin flexfed
install -d -o flexfed -g flexfed -m 0700 /var/lib/flexfed
install -d -o root -g flexfed -m 0750 /etc/flexfed
if [[ ! -f /etc/flexfed/ca/ca.key ]]; then
  "$ctl" ca init --dir /etc/flexfed/ca
  chown -R root:flexfed /etc/flexfed/ca
  chmod 0640 /etc/flexfed/ca/ca.key
else
  echo "provision.sh: /etc/flexfed/ca exists; keeping it"
fi
if [[ ! -f /etc/flexfed/coordinator.json ]]; then
  install -o root -g flexfed -m 0640 "$here/coordinator.json" /etc/flexfed/coordinator.json
  if (($# > 0)); then
    hosts=$(printf '"%s", ' "$@"); hosts="[${hosts%, }]"
    sed -i "s|\"hostname\": \[.*\]|\"hostname\": $hosts|" /etc/flexfed/coordinator.json
  fi
fi
echo "CA fingerprint for owners to pin:"
openssl x509 -in /etc/flexfed/ca/ca.crt -outform DER | sha256sum | cut -d' ' -f1
echo "admin identity: /etc/flexfed/ca/admin (copy it to the operators' machines, mode 0600)"
