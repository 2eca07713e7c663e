"""hostdevd: safe, boring PCI passthrough for libvirt/KVM hosts.

Data flows one way: sysfs -> topology -> plan -> execute -> ledger. The core
(everything but ``libvirt_events``, ``journal`` and ``daemon_main``) imports
neither libvirt nor systemd.
"""
__version__ = "0.1.0"
