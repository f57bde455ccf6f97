"""vmshift: live migration and cluster management for QEMU/KVM."""
