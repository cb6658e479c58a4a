#!/usr/bin/env bash
# Two "nodes" for the DeepSpeed runner's pdsh launcher on this machine: pdsh, an sshd listening
# on the loopback only (keys only, no passwords) and a key that lets root ssh to localhost and
# 127.0.0.1 (the hostfile names the machine twice). Debian packages, as root. Idempotent; it
# adds its key to root's ~/.ssh/authorized_keys and a block for the two names to root's
# ~/.ssh/config, so run it by hand only on a machine where that is wanted. Used by .ci/run;
# tests/test_pdsh.py launches through it.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "local_pdsh: needs root" >&2; exit 1; }
if ! command -v pdsh >/dev/null || [ ! -x /usr/sbin/sshd ]; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q --no-install-recommends pdsh openssh-server openssh-client \
    >/dev/null
fi
# ssh and sshd read root's home from the password database, whatever HOME says
ssh_dir="$(getent passwd root | cut -d: -f6)/.ssh"
mkdir -p /run/sshd "$ssh_dir"
chmod 700 "$ssh_dir"
key=$ssh_dir/dsfm_local_ed25519
[ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -C dsfm-local-pdsh -f "$key"
touch "$ssh_dir/authorized_keys"
grep -qF "$(cat "$key.pub")" "$ssh_dir/authorized_keys" || cat "$key.pub" >> "$ssh_dir/authorized_keys"
chmod 600 "$ssh_dir/authorized_keys"
if ! grep -q "dsfm-local-pdsh" "$ssh_dir/config" 2>/dev/null; then
  cat >> "$ssh_dir/config" <<CONF
# dsfm-local-pdsh: .ci/local_pdsh.sh
Host localhost 127.0.0.1
  IdentityFile $key
  StrictHostKeyChecking accept-new
  BatchMode yes
CONF
  chmod 600 "$ssh_dir/config"
fi
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A
# an sshd already answering (the system's, or this script's from an earlier call) is used as it is
if ! ssh localhost true 2>/dev/null; then
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o ListenAddress=::1 \
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no
fi
for _ in $(seq 20); do
  if ssh localhost true 2>/dev/null && ssh 127.0.0.1 true 2>/dev/null; then
    PDSH_RCMD_TYPE=ssh pdsh -w localhost,127.0.0.1 'echo node %n'
    exit 0
  fi
  sleep 0.5
done
echo "local_pdsh: ssh to localhost does not answer:" >&2
ssh localhost true 2>&1 | tail -3 >&2 || true
exit 1
