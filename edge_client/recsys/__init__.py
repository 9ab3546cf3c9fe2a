"""The recommender's device side: the frozen sequence encoder, the personal adapter, the device's MQTT client
and the MovieLens data it reads."""
