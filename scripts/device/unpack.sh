# Sourced by the device scripts after they cd to the checkout: unpacks what scripts/device/build.sh
# packed (.device/pack.tar.xz, carried instead of .device to stay within the carry limit), unless
# the binaries are already there.
if [ -f .device/pack.tar.xz ] && [ ! -x .device/bin/lipstream ]; then
  tar xJf .device/pack.tar.xz
fi
