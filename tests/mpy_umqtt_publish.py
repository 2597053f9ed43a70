# Runs under MicroPython: a board's path to the broker, with the real umqtt
# from micropython-lib (build/lib) and the protocol code. Publishes one signed
# reading (QoS 1) and one retained birth status, then disconnects.
# argv: host port user password community device secret_hex
import sys
import binascii
from umqtt_pinned.simple import MQTTClient
from protocol import link

host, port, user, pw, community, device, secret = sys.argv[1:8]
d = link.DeviceLink(community, device, binascii.unhexlify(secret))
c = MQTTClient(device, host, port=int(port), user=user, password=pw, keepalive=30)
c.connect()
c.publish(d.t_reading, bytes(d.reading(1, 2, 1795000000, 0, 2301, 5000, [250, 10, 0, 1100], 1)), qos=1)
c.publish(d.t_status, bytes(d.status({"boot": 1, "seq": 3, "t": 1795000000, "fw": "0.1.0", "cfg": b"\x00" * 8,
                                      "reset": 1, "heap": 80000, "uptime": 5, "buffered": 0, "online": 1,
                                      "board": "sim"})), retain=True, qos=1)
c.disconnect()
print("PUBLISHED")
