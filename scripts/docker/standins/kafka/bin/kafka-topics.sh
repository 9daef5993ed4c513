#!/bin/bash
# kafka-topics.sh of the Kafka distribution, reduced to its class.
exec java -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile=/etc/kafka/docker/log4j2.properties \
  -cp '/opt/kafka/libs/*' org.apache.kafka.tools.TopicCommand "$@"
