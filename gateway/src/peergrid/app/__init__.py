"""What the residents see: the member web app served by the gateway
(peergrid.app.members, static files in peergrid/app/static) and the house
values for Home Assistant over MQTT (peergrid.app.homeassistant)."""
